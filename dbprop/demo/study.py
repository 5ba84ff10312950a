"""The demo study: train the thesis network on 8×8 digits once per weight λ of ``DoubleBackpropLoss`` (λ = 0 is
plain cross-entropy) and once with ``JacobianPenalty``, then measure on the test set what Etmann et al. (ICML 2019)
relate: accuracy, linearised robustness ρ̃, alignment α of the saliency map with the image, binarised alignment
α†, and (with foolbox) the measured robustness ρ of L2 attacks. Prints a table, writes it with a figure to
``--out``."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..analysis import alignment, binarized_alignment, empirical_robustness, linearized_robustness
from ..modules import DoubleBackpropLoss, JacobianPenalty
from .data import class_separation, load_digits, thesis_network

QUICK = dict(epochs=20, lambdas=(0.0, 0.3, 1.0), attacks=("gradient",), attack_samples=100)
FULL = dict(epochs=50, lambdas=(0.0, 0.1, 0.3, 1.0), attacks=("gradient", "bim", "cw"), attack_samples=200)


@dataclass
class Run:
    """One training run and its test-set measurements (medians over the test samples)."""
    penalty: str                      # "plain", "DoubleBackpropLoss" or "JacobianPenalty"
    lam: float
    accuracy: float = math.nan
    rho_linearized: float = math.nan  # median ρ̃
    alignment: float = math.nan       # median α
    binarized_alignment: float = math.nan  # median α†
    rho_measured: float = math.nan    # median ρ of the attacks (nan without foolbox)
    ms_per_step: float = math.nan
    model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return "plain cross-entropy" if self.penalty == "plain" else f"{self.penalty} λ={self.lam:g}"

    @property
    def robustness(self) -> float:
        """The robustness the figure ranks by: measured ρ where available, else ρ̃."""
        return self.rho_linearized if math.isnan(self.rho_measured) else self.rho_measured


def _progress(desc: str, total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(desc=f"{desc:<28}", total=total, leave=True, ncols=90)


def train(run: Run, data, epochs: int, batch_size: int, seed: int, device: torch.device) -> nn.Module:
    """Adam (lr 1e-3) on ``cross_entropy + λ·‖∇x cross_entropy‖²`` (DoubleBackpropLoss) or
    ``cross_entropy + λ·‖J‖²_F`` (JacobianPenalty); records the mean wall time of a training step."""
    (x_train, y_train), _ = data
    torch.manual_seed(seed)
    model = thesis_network().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if run.penalty == "DoubleBackpropLoss":
        objective = DoubleBackpropLoss(model, weight=run.lam)
    elif run.penalty == "JacobianPenalty":
        jacobian = JacobianPenalty(model)
        objective = lambda x, y: nn.functional.cross_entropy(model(x), y) + run.lam * jacobian(x)  # noqa: E731
    else:
        objective = lambda x, y: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    n_batches = math.ceil(len(y_train) / batch_size)
    shuffle = torch.Generator().manual_seed(seed)
    bar = _progress(run.name, epochs * n_batches)
    step_time = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=shuffle).to(device)
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            t0 = time.perf_counter()
            loss = objective(x_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_time += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    run.ms_per_step = 1e3 * step_time / (epochs * n_batches)
    return model.eval()


def measure(run: Run, model: nn.Module, data, attacks: Sequence[str], attack_samples: int) -> None:
    """Fills in the test-set medians: accuracy, ρ̃, α, α† on every test sample, ρ of ``attacks`` (foolbox) on the
    first ``attack_samples``, all with respect to the predicted class."""
    _, (x_test, y_test) = data
    with torch.no_grad():
        run.accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    run.rho_linearized = linearized_robustness(model, x_test)[0].median().item()
    run.alignment = alignment(model, x_test).median().item()
    run.binarized_alignment = binarized_alignment(model, x_test).median().item()
    if attacks:
        run.rho_measured = empirical_robustness(model, x_test[:attack_samples], list(attacks)).median().item()
    run.model = model


def table(runs: List[Run], attacks: Sequence[str]) -> str:
    """The runs as a Markdown table."""
    measured = f"median ρ ({'+'.join(attacks)})" if attacks else "median ρ (not measured)"
    head = ["run", "test accuracy", "median ρ̃", measured, "median α", "median α†", "ms/step"]
    rows = [[r.name, f"{r.accuracy:.4f}", f"{r.rho_linearized:.3f}", f"{r.rho_measured:.3f}", f"{r.alignment:.3f}",
             f"{r.binarized_alignment:.3f}", f"{r.ms_per_step:.1f}"] for r in runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def _parse_lambdas(text: str) -> List[float]:
    try:
        lambdas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lambdas takes comma-separated numbers, got {text!r}") from None
    if not lambdas or any(not math.isfinite(v) or v < 0 for v in lambdas):
        raise argparse.ArgumentTypeError(f"--lambdas needs finite weights >= 0, got {text!r}")
    return lambdas


def _foolbox_available() -> bool:
    try:
        import foolbox  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dbprop demo", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help=f"short study (under two minutes on 2 cores): {QUICK['epochs']} epochs, "
                        f"λ ∈ {list(QUICK['lambdas'])}, gradient attack on {QUICK['attack_samples']} samples")
    p.add_argument("--epochs", type=int, help=f"epochs per run (default {FULL['epochs']})")
    p.add_argument("--lambdas", type=_parse_lambdas,
                   help=f"comma-separated DoubleBackpropLoss weights (default {','.join(map(str, FULL['lambdas']))})")
    p.add_argument("--jacobian-lambda", type=float, default=0.03, help="JacobianPenalty weight; 0 skips that run")
    p.add_argument("--attacks", help="comma-separated foolbox attacks among gradient, bim, cw, or 'none' "
                                     f"(default {','.join(FULL['attacks'])}; --quick: gradient)")
    p.add_argument("--attack-samples", type=int, help="test samples attacked (default 200; --quick: 100)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", default="dbprop-demo", help="folder for results.md, results.json and demo.png")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.epochs = preset["epochs"] if args.epochs is None else args.epochs
    args.lambdas = list(preset["lambdas"]) if args.lambdas is None else args.lambdas
    args.attack_samples = preset["attack_samples"] if args.attack_samples is None else args.attack_samples
    args.attacks = list(preset["attacks"]) if args.attacks is None else \
        [] if args.attacks == "none" else [a.strip() for a in args.attacks.split(",") if a.strip()]
    if args.epochs < 1 or args.batch_size < 1 or args.attack_samples < 1:
        p.error("--epochs, --batch-size and --attack-samples must be positive")
    if not math.isfinite(args.jacobian_lambda) or args.jacobian_lambda < 0:
        p.error("--jacobian-lambda must be a finite weight >= 0")
    unknown = set(args.attacks) - {"gradient", "bim", "cw"}
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; choose among gradient, bim, cw or 'none'")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch")
    if args.attacks and not _foolbox_available():
        print("foolbox is not installed (pip install 'dbprop[robustness]'): measured ρ is left out")
        args.attacks = []
    return args


def main(argv: Optional[list] = None) -> List[Run]:
    args = parse_args(argv)
    data = load_digits(args.seed)
    data = tuple((x.to(args.device), y.to(args.device)) for x, y in data)
    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} test, 8x8; thesis network; {args.epochs} epochs, "
          f"batch {args.batch_size}, seed {args.seed}, {args.device}")
    runs = [Run("plain" if lam == 0 else "DoubleBackpropLoss", lam) for lam in args.lambdas]
    if args.jacobian_lambda > 0:
        runs.append(Run("JacobianPenalty", args.jacobian_lambda))
    for run in runs:
        model = train(run, data, args.epochs, args.batch_size, args.seed, args.device)
        measure(run, model, data, args.attacks, args.attack_samples)
    separation = class_separation(data)
    text = table(runs, args.attacks) + ("\n\nClass separation (median over the test digits of half the distance to "
                                        f"the nearest training digit of another class): {separation:.3f}")
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
                   "class_separation": separation, "runs": [_record(r) for r in runs]}, f, indent=1)
    try:
        from .figure import figure
    except ImportError as e:
        print(f"no figure ({e}): pip install 'dbprop[demo]'")
    else:
        path = os.path.join(args.out, "demo.png")
        figure(runs, data[1], separation, path)
        print(f"wrote {path}")
    return runs


def _record(run: Run) -> Dict[str, object]:
    return {f.name: getattr(run, f.name) for f in fields(run) if f.name != "model"}
