"""The demo's figure: median alignment against median robustness across the runs, and the saliency maps
∇ₓΨ^{F(x)} of the least and the most robust model on one test digit of each class."""
from __future__ import annotations

import math
from typing import List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from ..analysis import saliency  # noqa: E402

ACCURACY_SLACK = 0.1   # runs more than this below the best test accuracy are not ranked for the saliency maps


def figure(runs: List["Run"], test: Tuple[Tensor, Tensor], separation: float, path: str) -> None:  # noqa: F821
    fig = plt.figure(figsize=(18, 5.2), layout="constrained")
    left, middle, right = fig.subfigures(1, 3, width_ratios=[1, 1, 1.9])
    _alignment_vs_robustness(left.subplots(), runs, separation)
    _binarized_alignment(middle.subplots(), runs)
    best = max(r.accuracy for r in runs)
    ranked = sorted((r for r in runs if r.accuracy >= best - ACCURACY_SLACK), key=lambda r: r.robustness)
    _saliency_grid(right, test, ranked[0], ranked[-1])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(run) -> str:
    return {"plain": "λ=0", "JacobianPenalty": f"Jacobian λ={run.lam:g}"}.get(run.penalty, f"λ={run.lam:g}")


def _alignment_vs_robustness(ax, runs, separation: float) -> None:
    measured = not any(math.isnan(r.rho_measured) for r in runs)
    for r in runs:
        marker = "s" if r.penalty == "JacobianPenalty" else "o"
        ax.scatter(r.rho_linearized, r.alignment, marker=marker, color="tab:blue")
        if measured:
            ax.scatter(r.rho_measured, r.alignment, marker=marker, facecolors="none", edgecolors="tab:red")
            ax.plot([r.rho_linearized, r.rho_measured], [r.alignment] * 2, color="0.8", lw=0.8, zorder=0)
        ax.annotate(_label(r), (r.rho_linearized, r.alignment), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axvline(separation, color="0.4", ls="--", lw=0.8, label="class separation of the data")
    ax.scatter([], [], color="tab:blue", label="linearised ρ̃")
    if measured:
        ax.scatter([], [], facecolors="none", edgecolors="tab:red", label="measured ρ (attacks)")
    ax.set_xlabel("median robustness (L2 distance to the decision boundary)")
    ax.set_ylabel(r"median alignment $\alpha = |\langle x, \nabla_x\Psi\rangle| \,/\, \|\nabla_x\Psi\|$")
    ax.set_title("alignment vs robustness on the test digits\n(○ DoubleBackpropLoss, □ JacobianPenalty)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3)


def _binarized_alignment(ax, runs) -> None:
    """Etmann et al.'s Theorem: ρ̃ = α† for bias-free ReLU nets, ρ̃ ≤ α† + |β†|/‖g†‖ with biases."""
    for r in runs:
        ax.scatter(r.rho_linearized, r.binarized_alignment, marker="s" if r.penalty == "JacobianPenalty" else "o",
                   color="tab:green")
        ax.annotate(_label(r), (r.rho_linearized, r.binarized_alignment), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=0.8, label="α† = ρ̃ (bias-free nets)")
    ax.set_xlabel("median linearised robustness ρ̃")
    ax.set_ylabel(r"median binarised alignment $\alpha^\dagger = |\langle x, g^\dagger\rangle| \,/\, \|g^\dagger\|$")
    ax.set_title("binarised alignment against robustness\n" + r"($g^\dagger = \nabla_x(\Psi^{i^*} - \Psi^{j^*})$)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(alpha=0.3)


def _saliency_grid(fig, test: Tuple[Tensor, Tensor], least, most) -> None:
    x_test, y_test = test
    picks = [int((y_test == c).nonzero()[0]) for c in y_test.unique().tolist()]
    x = x_test[picks]
    rows = [("input", x),
            (f"least robust:\n{least.name}\nmedian ρ {least.robustness:.3f}", saliency(least.model, x)),
            (f"most robust:\n{most.name}\nmedian ρ {most.robustness:.3f}", saliency(most.model, x))]
    axes = fig.subplots(len(rows), len(picks), squeeze=False)
    for row, (title, images) in enumerate(rows):
        for col, ax in enumerate(axes[row]):
            img = images[col, 0].detach().cpu().double().numpy()
            if row == 0:
                ax.imshow(img, cmap="gray_r", vmin=0, vmax=1)
            else:
                ax.imshow(img / max(abs(img).max(), 1e-300), cmap="seismic", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(r"saliency maps $\nabla_x\Psi^{F(x)}$ (red +, blue −, each scaled to its largest |value|)" + "\n"
                 f"least and most robust of the runs within {100 * ACCURACY_SLACK:.0f} accuracy points of the best",
                 fontsize=10)
