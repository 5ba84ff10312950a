"""The penalties as ``nn.Module``s built around a model (README, Usage).

``forward`` returns a scalar (or per-sample values with ``reduction="none"``) whose ``.backward()``
delivers the parameter gradients computed by the explicit passes, so
``(task_loss + lam * penalty(x)).backward()`` works with any optimizer. Models that cannot be compiled
fall back to autograd double backprop with one warning, unless ``strict=True``. Options are validated
at construction (by building the penalty once).

Like ``torch.nn`` losses, a penalty module owns no parameters or buffers: it keeps a plain reference to the
model, which ``parameters()``, ``state_dict()``, ``.to()``, ``.double()``, ``.train()`` / ``.eval()`` do not
traverse. Give the optimizer ``model.parameters()``; move, cast and switch modes on the model itself.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from . import backends
from . import functional as Fn
from . import penalties as P


class _PenaltyModule(nn.Module):
    model: nn.Module  # a reference, not a submodule (see the module docstring)

    def __init__(self, model: nn.Module, reduction: str = "mean", backend: str = "auto", strict: bool = False) -> None:
        super().__init__()
        self.model = model
        backends.resolve(backend)  # an unknown backend, or "native" without the extension, fails here
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.reduction, self.backend, self.strict = P.check_reduction(reduction), backend, strict

    def __setattr__(self, name: str, value) -> None:
        if name == "model":  # bypass nn.Module's registration of submodules
            P.check_model(value)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _opts(self):
        return dict(reduction=self.reduction, backend=self.backend, strict=self.strict)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, reduction={self.reduction!r}, backend={self.backend!r}"


class JacobianPenalty(_PenaltyModule):
    """``‖J‖²_F`` of the model's logits or softmax output per sample; see :func:`dbprop.functional.jacobian_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", estimator: str = "exact", num_projections: int = 1,
                 chunk_size: Optional[int] = None, reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.JacobianFrobenius(output, estimator, num_projections)
        P.check_chunk_size(chunk_size)
        self.output, self.estimator = output, estimator
        self.num_projections, self.chunk_size = num_projections, chunk_size

    def forward(self, x: Tensor) -> Tensor:
        return Fn.jacobian_penalty(self.model, x, self.output, self.estimator, self.num_projections,
                                   self.chunk_size, **self._opts())


class OutputGradientPenalty(_PenaltyModule):
    """``‖∇x x_L^{index}‖²`` per sample; see :func:`dbprop.functional.output_gradient_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        self.output = P.OutputGradient(output).output

    def forward(self, x: Tensor, index: Union[int, Tensor]) -> Tensor:
        return Fn.output_gradient_penalty(self.model, x, index, self.output, **self._opts())


class DoubleBackpropLoss(_PenaltyModule):
    """``ℓ + weight·‖∇x ℓ‖²`` (Drucker & LeCun); see :func:`dbprop.functional.double_backprop_loss`."""

    def __init__(self, model: nn.Module, weight: float, loss: str = "cross_entropy", reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.DoubleBackprop(None, weight, loss)
        self.weight, self.loss = float(weight), loss

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return Fn.double_backprop_loss(self.model, x, y, self.weight, self.loss, **self._opts())


class SpectralNormPenalty(_PenaltyModule):
    """Power-iteration lower bound on ``‖J‖₂``; see :func:`dbprop.functional.spectral_norm_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", power_iterations: int = 1, reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.SpectralNorm(output, power_iterations)
        self.output, self.power_iterations = output, power_iterations

    def forward(self, x: Tensor) -> Tensor:
        return Fn.spectral_norm_penalty(self.model, x, self.output, self.power_iterations, **self._opts())


class RelevancePenalty(_PenaltyModule):
    """DRR on LRP-z relevance ``x ⊙ ∇x Ψ^y``; see :func:`dbprop.functional.relevance_penalty`."""

    def __init__(self, model: nn.Module, l1: float = 0.0, l2: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.Relevance(None, l1, l2)
        self.l1, self.l2 = float(l1), float(l2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return Fn.relevance_penalty(self.model, x, y, self.l1, self.l2, **self._opts())


class AlignmentPenalty(_PenaltyModule):
    """Saliency misalignment; see :func:`dbprop.functional.alignment_penalty`."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return Fn.alignment_penalty(self.model, x, y, **self._opts())


class GradientPenalty(_PenaltyModule):
    """WGAN-GP / R1 for scalar critics; see :func:`dbprop.functional.gradient_penalty`."""

    def __init__(self, model: nn.Module, center: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        self.center = float(center)

    def forward(self, x: Tensor) -> Tensor:
        return Fn.gradient_penalty(self.model, x, self.center, **self._opts())
