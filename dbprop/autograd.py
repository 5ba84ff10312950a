"""The eager path: the autograd Function that ties a penalty's value to the gradients of dbprop/core.py."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from . import core
from .penalties import Penalty


SECOND_DERIVATIVE_ERROR = (
    "dbprop: a penalty's gradient is not differentiable again (its backward is the closed-form result of the "
    "explicit passes, with no graph): backward(create_graph=True) / autograd.grad(..., create_graph=True) "
    "through a dbprop penalty cannot give third derivatives. Use create_graph=False for it, or the autograd "
    "formulation (dbprop.fallback) if you need them.")


def _differentiable_once(backward):
    """Like ``torch.autograd.function.once_differentiable``, with an error that says what happened; the
    outputs of a ``create_graph=True`` backward carry the error whenever the penalty's inputs require grad
    (the gradient depends on them), not only when the incoming gradient does."""

    @functools.wraps(backward)
    def wrapper(ctx, *args):
        with torch.no_grad():
            outputs = backward(ctx, *args)
        if not torch.is_grad_enabled() or not (any(ctx.needs_input_grad)
                                               or any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return outputs
        err = torch._C._functions.DelayedError(SECOND_DERIVATIVE_ERROR.encode(), len(outputs))
        return err(*[None if o is None else o.detach().requires_grad_(True) for o in outputs])
    return wrapper


class DoubleBackpropFunction(torch.autograd.Function):
    """``R = reduce(R_b)`` whose backward returns ``∇x R`` and ``∇θ R`` for every parameter.

    The gradients are computed eagerly in ``forward`` (Algorithm 4 needs the per-class cotangents that
    exist only there) by ``core.value_and_grads``, on the program or the autograd fallback; ``backward``
    applies them to the incoming gradient by ``core.weighted_grads`` (for ``reduction="none"`` with
    non-uniform incoming per-sample weights: recomputed from the saved forward pass with those weights, exact).

    Autograd semantics: the gradients and the inputs go through ``save_for_backward``, so a second
    ``backward()`` without ``retain_graph=True`` raises like any other graph, a parameter (or ``x``)
    modified in place between the call and ``backward()`` raises autograd's version-counter error (the
    gradients belong to the old values), saved-tensor hooks see them, and differentiating the gradient
    again raises ``SECOND_DERIVATIVE_ERROR`` when that is attempted. A call with gradients enabled pays for
    the gradients even if ``backward()`` never comes; evaluate under ``torch.no_grad()`` for the value alone.
    """

    @staticmethod
    def forward(ctx, ev: core.Evaluation, x: Tensor, *params: Tensor) -> Tensor:
        ctx.need_input, ctx.need_params = ctx.needs_input_grad[1], list(ctx.needs_input_grad[2:])
        g = core.value_and_grads(ev, x, params, ctx.need_input, ctx.need_params, keep=ev.reduction == "none")
        ctx.ev, ctx.state, ctx.num_params = ev, g.state, len(params)
        ctx.save_for_backward(x, *params, g.input_grad, *g.param_grads)
        return g.value

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_output: Tensor):
        saved = ctx.saved_tensors  # raises if freed by an earlier backward, or if an input changed in place
        L = ctx.num_params
        x, params = saved[0], saved[1:1 + L]
        grads = core.Grads(None, saved[1 + L], list(saved[2 + L:]), ctx.state)
        gx, gps = core.weighted_grads(ctx.ev, x, params, ctx.need_input, ctx.need_params, grad_output, grads)
        return (None, gx, *gps)


def evaluate(model: nn.Module, head: Penalty, x: Tensor, reduction: str, chunk_size: Optional[int],
             backend: str, strict: bool, stacklevel: int) -> Tensor:
    """One eager call: the checks, the autocast policy and the program-or-fallback choice of dbprop/core.py, then
    a plain value when no gradient is wanted, else the value through the Function."""
    backend = core.check_call(model, x, reduction, chunk_size, backend)
    off, x = core.autocast_off(model, x)
    with off:
        ev = core.prepare(model, head, x, reduction, chunk_size, backend, strict, stacklevel + 1)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in ev.params)):
            return DoubleBackpropFunction.apply(ev, x, *ev.params)
        return core.value_and_grads(ev, x, ev.params).value
