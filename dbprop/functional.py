"""Functional forms of the penalties: the same maths as the modules, no module state.

Every function returns ``reduce(R_b)`` over samples (``reduction`` "mean" | "sum" | "none"); each ``R_b``
uses the PER-SAMPLE input gradient of sample ``b``. Its ``.backward()`` delivers the gradients of all the
model's parameters (and of ``x`` when it requires grad) computed by the explicit passes.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .autograd import evaluate
from .core import FallbackWarning  # noqa: F401  (dbprop.functional.FallbackWarning)
from .penalties import Alignment, DoubleBackprop, GradientNorm, JacobianFrobenius, OutputGradient, Penalty, Relevance, \
    SpectralNorm

__all__ = ["jacobian_penalty", "output_gradient_penalty", "double_backprop_loss", "spectral_norm_penalty",
           "relevance_penalty", "alignment_penalty", "gradient_penalty"]


def penalty(model: nn.Module, x: Tensor, head: Penalty, reduction: str = "mean", chunk_size: Optional[int] = None,
            backend: str = "auto", strict: bool = False) -> Tensor:
    """Evaluate any penalty ``head`` (from :mod:`dbprop.penalties`) on ``model`` at ``x``.

    Mixed precision: inside ``torch.autocast`` the penalty runs in the precision of the model's parameters
    with autocast switched off (README, "Mixed precision"): ``x`` is cast to that dtype (differentiably) and
    the value comes back in it. Gradient scaling (``torch.amp.GradScaler``) works as for any loss term.
    """
    return evaluate(model, head, x, reduction, chunk_size, backend, strict, stacklevel=3)


def jacobian_penalty(model: nn.Module, x: Tensor, output: str = "logits", estimator: str = "exact",
                     num_projections: int = 1, chunk_size: Optional[int] = None, reduction: str = "mean",
                     backend: str = "auto", strict: bool = False) -> Tensor:
    """``‖J(x_b)‖²_F = Σ_i ‖∇x x_L^i‖²`` per sample (exact: accumulated-eta Algorithm 4, ``chunk_size`` classes
    per batched pass; "random": ``num_projections`` projections ``√C u``, ``u`` uniform on the sphere)."""
    return penalty(model, x, JacobianFrobenius(output, estimator, num_projections), reduction, chunk_size,
                   backend, strict)


def output_gradient_penalty(model: nn.Module, x: Tensor, index: Union[int, Tensor], output: str = "logits",
                            reduction: str = "mean", backend: str = "auto", strict: bool = False) -> Tensor:
    """``‖∇x x_L^{i_b}‖²`` per sample for output ``index`` (an int or a ``(B,)`` integer tensor)."""
    return penalty(model, x, OutputGradient(output, index), reduction, None, backend, strict)


def double_backprop_loss(model: nn.Module, x: Tensor, y: Tensor, weight: float, loss: str = "cross_entropy",
                         reduction: str = "mean", backend: str = "auto", strict: bool = False) -> Tensor:
    """``ℓ_b + weight·‖∇x ℓ_b‖²`` with ``ℓ`` cross-entropy (integer labels ``y``) or ``‖z_L − y‖²`` summed over
    outputs ("mse", float targets of shape (B, C))."""
    return penalty(model, x, DoubleBackprop(y, weight, loss), reduction, None, backend, strict)


def spectral_norm_penalty(model: nn.Module, x: Tensor, output: str = "logits", power_iterations: int = 1,
                          reduction: str = "mean", backend: str = "auto", strict: bool = False) -> Tensor:
    """``‖J(x_b)ᵀ v_b‖`` with ``v_b`` from ``power_iterations`` power iterations (a lower bound on ‖J‖₂)."""
    return penalty(model, x, SpectralNorm(output, power_iterations), reduction, None, backend, strict)


def relevance_penalty(model: nn.Module, x: Tensor, y: Tensor, l1: float = 0.0, l2: float = 0.0,
                      reduction: str = "mean", backend: str = "auto", strict: bool = False) -> Tensor:
    """DRR: ``l1‖r‖₁ + l2‖r‖²₂`` with LRP-z relevance ``r = x ⊙ ∇x Ψ^{y}``."""
    return penalty(model, x, Relevance(y, l1, l2), reduction, None, backend, strict)


def alignment_penalty(model: nn.Module, x: Tensor, y: Tensor, reduction: str = "mean", backend: str = "auto",
                      strict: bool = False) -> Tensor:
    """``‖x‖²‖∇x Ψ^{y}‖² − ⟨x, ∇x Ψ^{y}⟩²`` (zero iff the saliency map is aligned with the input)."""
    return penalty(model, x, Alignment(y), reduction, None, backend, strict)


def gradient_penalty(model: nn.Module, x: Tensor, center: float = 1.0, reduction: str = "mean",
                     backend: str = "auto", strict: bool = False) -> Tensor:
    """WGAN-GP / R1 for a scalar critic: ``(‖∇x D(x_b)‖ − center)²`` (``center=0`` gives R1 up to a factor)."""
    return penalty(model, x, GradientNorm(center), reduction, None, backend, strict)
