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

import torch
from torch import Tensor, nn

from . import backends, core, ops
from . import functional as Fn
from . import penalties as P


class PenaltyModule(nn.Module):
    """The generic penalty module: a penalty head (a :class:`dbprop.penalties.Penalty`) around a model.

    A penalty is its head plus a small subclass: a constructor that passes its options (keyword arguments,
    stored as attributes and validated by building the head once), ``_head(labels)`` (a fresh head for one
    call, reading those attributes) and ``forward`` returning ``self._evaluate(x[, labels])``. Eager calls run
    ``dbprop.functional.penalty``; under ``torch.compile`` the call is one opaque operator (dbprop/ops.py).
    Both evaluate through dbprop/core.py.
    """

    model: nn.Module  # a reference, not a submodule (see the module docstring)

    def __init__(self, model: nn.Module, reduction: str = "mean", backend: str = "auto", strict: bool = False,
                 chunk_size: Optional[int] = None, **options) -> None:
        super().__init__()
        self.model = model
        backends.resolve(backend)  # an unknown backend, or "native" without the extension, fails here
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.reduction, self.backend, self.strict = P.check_reduction(reduction), backend, strict
        for name, value in options.items():
            setattr(self, name, value)
        # the options are checked by the head's constructor; DoubleBackpropLoss replaces the task forward, so
        # under torch.compile the operator returns the model's buffers moved (BatchNorm statistics)
        self._head_updates_buffers = self._head(None).has_loss
        P.check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self._handle = ops.register(self)  # names this module to torch.ops.dbprop.penalty (torch.compile)

    def _head(self, labels: Optional[Tensor]) -> P.Penalty:
        """A fresh penalty head for one call (``labels``: the integer labels / index / targets, or None)."""
        raise NotImplementedError

    def _evaluate(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if not torch.compiler.is_compiling():
            return Fn.penalty(self.model, x, self._head(labels), self.reduction, self.chunk_size, self.backend,
                              self.strict)
        # traced by torch.compile: one opaque operator (dbprop/ops.py) that runs the evaluation core
        off, x = core.autocast_off(self.model, x)
        with off:
            params = list(self.model.parameters())
            grad = torch.is_grad_enabled()
            need_params = [grad and p.requires_grad for p in params]
            buffers = list(self.model.buffers())
            value, _, _, new_buffers = torch.ops.dbprop.penalty(x, params, labels, buffers, self._handle,
                                                                need_params, grad and x.requires_grad)
            with torch.no_grad():
                for b, new in zip(buffers, new_buffers):
                    b.copy_(new)
            return value

    def __setattr__(self, name: str, value) -> None:
        if name == "model":  # bypass nn.Module's registration of submodules
            P.check_model(value)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, reduction={self.reduction!r}, backend={self.backend!r}"


class JacobianPenalty(PenaltyModule):
    """``‖J‖²_F`` of the model's logits or softmax output per sample; see :func:`dbprop.functional.jacobian_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", estimator: str = "exact", num_projections: int = 1,
                 chunk_size: Optional[int] = None, reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict, chunk_size, output=output, estimator=estimator,
                         num_projections=num_projections)

    def _head(self, labels):
        return P.JacobianFrobenius(self.output, self.estimator, self.num_projections)

    def forward(self, x: Tensor) -> Tensor:
        return self._evaluate(x)


class OutputGradientPenalty(PenaltyModule):
    """``‖∇x x_L^{index}‖²`` per sample; see :func:`dbprop.functional.output_gradient_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict, output=output)

    def _head(self, labels):
        return P.OutputGradient(self.output, labels)

    def forward(self, x: Tensor, index: Union[int, Tensor]) -> Tensor:
        if isinstance(index, int) and not isinstance(index, bool):
            index = torch.full(x.shape[:1], index, dtype=torch.long, device=x.device)
        return self._evaluate(x, index)


class DoubleBackpropLoss(PenaltyModule):
    """``ℓ + weight·‖∇x ℓ‖²`` (Drucker & LeCun); see :func:`dbprop.functional.double_backprop_loss`."""

    def __init__(self, model: nn.Module, weight: float, loss: str = "cross_entropy", reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict, weight=weight, loss=loss)
        self.weight = float(weight)

    def _head(self, labels):
        return P.DoubleBackprop(labels, self.weight, self.loss)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y)


class SpectralNormPenalty(PenaltyModule):
    """Power-iteration lower bound on ``‖J‖₂``; see :func:`dbprop.functional.spectral_norm_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", power_iterations: int = 1, reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict, output=output, power_iterations=power_iterations)

    def _head(self, labels):
        return P.SpectralNorm(self.output, self.power_iterations)

    def forward(self, x: Tensor) -> Tensor:
        return self._evaluate(x)


class RelevancePenalty(PenaltyModule):
    """DRR on LRP-z relevance ``x ⊙ ∇x Ψ^y``; see :func:`dbprop.functional.relevance_penalty`."""

    def __init__(self, model: nn.Module, l1: float = 0.0, l2: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict, l1=l1, l2=l2)
        self.l1, self.l2 = float(l1), float(l2)

    def _head(self, labels):
        return P.Relevance(labels, self.l1, self.l2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y)


class AlignmentPenalty(PenaltyModule):
    """Saliency misalignment; see :func:`dbprop.functional.alignment_penalty`."""

    def __init__(self, model: nn.Module, reduction: str = "mean", backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)

    def _head(self, labels):
        return P.Alignment(labels)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y)


class GradientPenalty(PenaltyModule):
    """WGAN-GP / R1 for scalar critics; see :func:`dbprop.functional.gradient_penalty`."""

    def __init__(self, model: nn.Module, center: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict, center=center)
        self.center = float(center)

    def _head(self, labels):
        return P.GradientNorm(self.center)

    def forward(self, x: Tensor) -> Tensor:
        return self._evaluate(x)
