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

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import backends, engine, fallback, ops
from . import functional as Fn
from . import penalties as P
from .autograd import reduce


class _PenaltyModule(nn.Module):
    model: nn.Module  # a reference, not a submodule (see the module docstring)

    chunk_size: Optional[int] = None

    def __init__(self, model: nn.Module, reduction: str = "mean", backend: str = "auto", strict: bool = False) -> None:
        super().__init__()
        self.model = model
        backends.resolve(backend)  # an unknown backend, or "native" without the extension, fails here
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.reduction, self.backend, self.strict = P.check_reduction(reduction), backend, strict
        self._handle = ops.register(self)  # names this module to torch.ops.dbprop.penalty (torch.compile)

    # ---- one evaluation, eager or traced
    def _head(self, labels: Optional[Tensor]) -> P.Penalty:
        """A fresh penalty head for one call (``labels``: the integer labels / index / targets, or None)."""
        raise NotImplementedError

    def _evaluate(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if not torch.compiler.is_compiling():
            return Fn.penalty(self.model, x, self._head(labels), self.reduction, self.chunk_size, **self._backend())
        # traced by torch.compile: one opaque operator (dbprop/ops.py) that runs the eager computation
        off, x = Fn.autocast_off(self.model, x)
        with off:
            return self._operator(x, labels)

    def _operator(self, x: Tensor, labels: Optional[Tensor]) -> Tensor:
        params = list(self.model.parameters())
        grad = torch.is_grad_enabled()
        need_params = [grad and p.requires_grad for p in params]
        buffers = list(self.model.buffers()) if self._head_updates_buffers else []
        value, _, _, new_buffers = torch.ops.dbprop.penalty(x, params, labels, buffers, self._handle, need_params,
                                                            grad and x.requires_grad)
        with torch.no_grad():
            for b, new in zip(buffers, new_buffers):
                b.copy_(new)
        return value

    _head_updates_buffers = False  # DoubleBackpropLoss replaces the task forward: BatchNorm statistics move

    def _value_and_grads(self, x: Tensor, labels: Optional[Tensor], params: List[Tensor], need_params: List[bool],
                         need_input: bool, weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """The operator's implementation (eager, at run time): the reduced value, and the gradients of
        ``value`` (or of ``Σ_b weight_b R_b`` when ``weight`` is given) w.r.t. ``x`` and each parameter of
        ``self.model`` (``params`` lists them in ``model.parameters()`` order; zeros where not wanted).
        Straight through the engine, no autograd (a compiled backward runs with autograd switched off)."""
        live = list(self.model.parameters())
        if len(live) != len(params) or any(a.shape != b.shape for a, b in zip(live, params)):
            raise RuntimeError("dbprop::penalty: the model's parameters changed since the graph was traced")
        P.check_input(x)  # here, at run time: the finiteness check syncs, it must not break the graph
        head, B = self._head(labels), x.shape[0]
        if weight is None:  # the value; gradients of the reduced value (none: the backward recomputes)
            weight = torch.full((B,), 1.0 / B if self.reduction == "mean" else 1.0, dtype=x.dtype, device=x.device)
            grads_now = self.reduction != "none"
        else:
            grads_now = True
        want_params = grads_now and any(need_params)
        want_x = grads_now and need_input
        program = Fn.compiled_or_none(self.model, x, self.strict, stacklevel=2)
        if program is None:
            return self._fallback_value_and_grads(x, head, live, need_params, want_x, weight, grads_now)
        r = engine.run(program, head, x.detach(), sample_weight=weight, need_param_grads=want_params,
                       need_input_grad=want_x, chunk_size=self.chunk_size, backend=backends.resolve(self.backend),
                       update_stats=head.has_loss and not (grads_now and self.reduction == "none"))
        by_id = dict(zip(map(id, program.parameters()), r.param_grads or []))
        gps = [by_id[id(p)] if want and by_id.get(id(p)) is not None else torch.zeros_like(p)
               for p, want in zip(live, need_params)]
        gx = r.input_grad if want_x else torch.zeros_like(x)
        return reduce(r.value, self.reduction), gx, gps

    def _fallback_value_and_grads(self, x, head, live, need_params, want_x, weight, grads_now):
        """Autograd double backprop for models the passes cannot run (needs autograd: not in a compiled
        backward, i.e. not with reduction='none' under torch.compile)."""
        want = [p for p, w in zip(live, need_params) if w] if grads_now else []
        with torch.enable_grad():
            xr = x.detach().requires_grad_(want_x)
            values = fallback.autograd_penalty(self.model, head, xr)
            grads = torch.autograd.grad((values * weight).sum(), ([xr] if want_x else []) + want,
                                        allow_unused=True) if (want or want_x) else []
        grads = list(grads)
        gx = grads.pop(0) if want_x else None
        by_id = dict(zip(map(id, want), grads))
        gps = [torch.zeros_like(p) if by_id.get(id(p)) is None else by_id[id(p)] for p in live]
        return reduce(values.detach(), self.reduction), torch.zeros_like(x) if gx is None else gx, gps

    def _backend(self):
        return dict(backend=self.backend, strict=self.strict)

    def __setattr__(self, name: str, value) -> None:
        if name == "model":  # bypass nn.Module's registration of submodules
            P.check_model(value)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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

    def _head(self, labels):
        return P.JacobianFrobenius(self.output, self.estimator, self.num_projections)

    def forward(self, x: Tensor) -> Tensor:
        return self._evaluate(x)


class OutputGradientPenalty(_PenaltyModule):
    """``‖∇x x_L^{index}‖²`` per sample; see :func:`dbprop.functional.output_gradient_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        self.output = P.OutputGradient(output).output

    def _head(self, labels):
        return P.OutputGradient(self.output, labels)

    def forward(self, x: Tensor, index: Union[int, Tensor]) -> Tensor:
        if isinstance(index, int) and not isinstance(index, bool):
            index = torch.full(x.shape[:1], index, dtype=torch.long, device=x.device)
        return self._evaluate(x, index)


class DoubleBackpropLoss(_PenaltyModule):
    """``ℓ + weight·‖∇x ℓ‖²`` (Drucker & LeCun); see :func:`dbprop.functional.double_backprop_loss`."""

    def __init__(self, model: nn.Module, weight: float, loss: str = "cross_entropy", reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.DoubleBackprop(None, weight, loss)
        self.weight, self.loss = float(weight), loss

    _head_updates_buffers = True

    def _head(self, labels):
        return P.DoubleBackprop(labels, self.weight, self.loss)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y)


class SpectralNormPenalty(_PenaltyModule):
    """Power-iteration lower bound on ``‖J‖₂``; see :func:`dbprop.functional.spectral_norm_penalty`."""

    def __init__(self, model: nn.Module, output: str = "logits", power_iterations: int = 1, reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.SpectralNorm(output, power_iterations)
        self.output, self.power_iterations = output, power_iterations

    def _head(self, labels):
        return P.SpectralNorm(self.output, self.power_iterations)

    def forward(self, x: Tensor) -> Tensor:
        return self._evaluate(x)


class RelevancePenalty(_PenaltyModule):
    """DRR on LRP-z relevance ``x ⊙ ∇x Ψ^y``; see :func:`dbprop.functional.relevance_penalty`."""

    def __init__(self, model: nn.Module, l1: float = 0.0, l2: float = 0.0, reduction: str = "mean",
                 backend: str = "auto", strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        P.Relevance(None, l1, l2)
        self.l1, self.l2 = float(l1), float(l2)

    def _head(self, labels):
        return P.Relevance(labels, self.l1, self.l2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y)


class AlignmentPenalty(_PenaltyModule):
    """Saliency misalignment; see :func:`dbprop.functional.alignment_penalty`."""

    def _head(self, labels):
        return P.Alignment(labels)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._evaluate(x, y)


class GradientPenalty(_PenaltyModule):
    """WGAN-GP / R1 for scalar critics; see :func:`dbprop.functional.gradient_penalty`."""

    def __init__(self, model: nn.Module, center: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 strict: bool = False) -> None:
        super().__init__(model, reduction, backend, strict)
        self.center = float(center)

    def _head(self, labels):
        return P.GradientNorm(self.center)

    def forward(self, x: Tensor) -> Tensor:
        return self._evaluate(x)
