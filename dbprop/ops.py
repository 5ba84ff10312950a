"""dbprop's penalties as a dispatcher operator, so that ``torch.compile`` can trace a training step whole.

``torch.ops.dbprop.penalty(x, params, labels, buffers, handle, need_params, need_input)`` is a
``torch.library.custom_op``: an opaque node for Dynamo and AOTAutograd, with a fake (meta) implementation
for tracing and an autograd formula registered with ``register_autograd``. It returns the reduced penalty
value together with the gradients the explicit passes computed (``∇x R`` and ``∇θ R`` per parameter of the
model, in ``model.parameters()`` order); its backward scales them by the incoming gradient (for
``reduction="none"`` it recomputes them with the incoming per-sample weights through ``dbprop::penalty_grads``,
exact also for coupled samples). ``handle`` names a penalty MODULE (registered at construction): the op's
implementation runs the evaluation core (dbprop/core.py: checks, program cache, self-check, native or Python
passes, autograd fallback) for that module at run time, so nothing dbprop does in Python is traced.

Why ``custom_op`` over a C++ ``TORCH_LIBRARY`` schema: the unit that must be opaque to the compiler is the
whole penalty (program lookup, class chunks, Algorithm 4), which is driven from Python; its native kernels
are already single ATen-level calls below it. Checks that would sync the device (finite input) run inside
the op's implementation, i.e. at run time, and do not break the graph.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import core

_registry: Dict[int, "weakref.ReferenceType"] = {}
_handles = itertools.count(1)


def register(penalty_module) -> int:
    """A handle for ``penalty_module`` (weakly referenced) that the operator can carry as an int."""
    h = next(_handles)
    _registry[h] = weakref.ref(penalty_module)
    return h


def _module(handle: int):
    m = _registry.get(handle)
    m = m() if m is not None else None
    if m is None:
        raise RuntimeError(f"dbprop::penalty: the penalty module of handle {handle} no longer exists")
    return m


def _implementation(handle: int, x: Tensor, labels: Optional[Tensor], params: List[Tensor], need_params: List[bool],
                    need_input: bool, weight: Optional[Tensor]) -> Tuple[Optional[Tensor], Tensor, List[Tensor]]:
    """Both operators' implementation (eager, at run time) through dbprop/core.py: the reduced value and its
    gradients w.r.t. ``x`` and each parameter of the module's model (zeros where not wanted); with ``weight``,
    the gradients of ``Σ_b weight_b R_b`` instead (``core.weighted_grads``) and no value. For
    ``reduction="none"`` the value comes alone: the backward recomputes with its per-sample weights.

    A custom op's implementation runs below the autograd dispatch key; the core runs with it again, as in eager
    use (smooth activations, opaque nodes and the fallback take local derivatives with autograd)."""
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        return _run(handle, x, labels, params, need_params, need_input, weight)


def _run(handle, x, labels, params, need_params, need_input, weight):
    module = _module(handle)
    model = module.model
    live = list(model.parameters())  # the tensors the program's gradients belong to (``params`` may be proxies)
    if len(live) != len(params) or any(a.shape != b.shape for a, b in zip(live, params)):
        raise RuntimeError("dbprop::penalty: the model's parameters changed since the graph was traced")
    # the checks here, at run time: the finiteness check syncs, it must not break the graph
    backend = core.check_call(model, x, module.reduction, module.chunk_size, module.backend)
    ev = core.prepare(model, module._head(labels), x, module.reduction, module.chunk_size, backend, module.strict,
                      stacklevel=3, recompute=weight is not None)
    if weight is None:
        now = module.reduction != "none"
        r = core.value_and_grads(ev, x, live, now and need_input, [now and n for n in need_params])
        value, gx, gps = r.value, r.input_grad, r.param_grads
    else:
        value = None
        gx, gps = core.weighted_grads(ev, x, live, need_input, need_params, weight)
    return (value, torch.zeros_like(x) if gx is None else gx,
            [torch.zeros_like(p) if g is None else g for p, g in zip(live, gps)])


@torch.library.custom_op("dbprop::penalty", mutates_args=())
def penalty(x: Tensor, params: List[Tensor], labels: Optional[Tensor], buffers: List[Tensor], handle: int,
            need_params: List[bool], need_input: bool) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor]]:
    """``(reduced value, ∇x R (zeros unless need_input), [∇θ R per parameter (zeros where not needed)],
    [new values of buffers])``. ``buffers``: the values of the model's buffers at this point of the step (inputs,
    so that the compiler orders the call after the step's earlier updates of them: a spectral_norm power
    iteration in the task forward); the new values come back when the penalty replaces the task forward
    (double backprop: BatchNorm running statistics move), else none. The op itself changes nothing (it is
    functional); the caller writes the new values back."""
    module = _module(handle)
    with _buffers_as(module.model, buffers) as live:
        value, gx, gps = _implementation(handle, x, labels, params, need_params, need_input, None)
        after = [b.clone() for b in live] if module._head_updates_buffers else []
    return value, gx, gps, after


@contextlib.contextmanager
def _buffers_as(model, values: List[Tensor]):
    """The model's buffers hold ``values`` inside (the op's inputs; in eager use, the buffers themselves), and
    what they held before afterwards."""
    live = list(model.buffers())
    if len(live) != len(values):
        raise RuntimeError("dbprop::penalty: the model's buffers changed since the graph was traced")
    before = [b.clone() for b in live]
    with torch.no_grad():
        for b, v in zip(live, values):
            if v is not b:
                b.copy_(v)
    try:
        yield live
    finally:
        with torch.no_grad():
            for b, old in zip(live, before):
                if not torch.equal(b, old):
                    b.copy_(old)


@penalty.register_fake
def _(x, params, labels, buffers, handle, need_params, need_input):
    module = _module(handle)
    value = x.new_empty(()) if module.reduction != "none" else x.new_empty(x.shape[:1])
    moved = [torch.empty_like(b) for b in buffers] if module._head_updates_buffers else []
    return value, torch.empty_like(x), [torch.empty_like(p) for p in params], moved


@torch.library.custom_op("dbprop::penalty_grads", mutates_args=())
def penalty_grads(x: Tensor, params: List[Tensor], labels: Optional[Tensor], buffers: List[Tensor], weight: Tensor,
                  handle: int, need_params: List[bool], need_input: bool) -> Tuple[Tensor, List[Tensor]]:
    """``∇ Σ_b weight_b R_b`` (``reduction="none"``): ``(∇x, [∇θ per parameter])``, recomputed with those weights
    from the buffers as the forward call left them (``buffers``)."""
    with _buffers_as(_module(handle).model, buffers):
        _, gx, gps = _implementation(handle, x, labels, params, need_params, need_input, weight)
    return gx, gps


@penalty_grads.register_fake
def _(x, params, labels, buffers, weight, handle, need_params, need_input):
    return torch.empty_like(x), [torch.empty_like(p) for p in params]


def _no_second_derivative(ctx, *grads):
    from .autograd import SECOND_DERIVATIVE_ERROR
    raise RuntimeError(SECOND_DERIVATIVE_ERROR)


penalty_grads.register_autograd(_no_second_derivative, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    x, params, labels, buffers, handle, need_params, need_input = inputs
    _, gx, gps, moved = output
    ctx.handle, ctx.need_params, ctx.need_input, ctx.num_params = handle, need_params, need_input, len(params)
    ctx.num_buffers = len(buffers)
    ctx.none = _module(handle).reduction == "none"
    # the buffers as the call left them, for a recompute (copies: the step may update them in place later)
    state = (moved or [b.detach().clone() for b in buffers]) if ctx.none else []
    ctx.save_for_backward(gx, x, labels, *gps, *params, *state)


def _backward(ctx, g_value, g_input_grad, g_param_grads, g_buffers):
    saved = ctx.saved_tensors
    n = ctx.num_params
    gx, x, labels, gps = saved[0], saved[1], saved[2], list(saved[3:3 + n])
    params, state = list(saved[3 + n:3 + 2 * n]), list(saved[3 + 2 * n:])
    if ctx.none:  # per-sample weights: recompute (exact where samples are coupled)
        gx, gps = penalty_grads(x, params, labels, state, g_value, ctx.handle, ctx.need_params, ctx.need_input)
    else:
        gx, gps = gx * g_value, [g * g_value for g in gps]
    grad_params = [g if want else None for g, want in zip(gps, ctx.need_params)]
    # one entry per input, lists for tensor-list inputs (custom_op checks the structure)
    return gx if ctx.need_input else None, grad_params, None, [None] * ctx.num_buffers, None, None, None


penalty.register_autograd(_backward, setup_context=_setup_context)
