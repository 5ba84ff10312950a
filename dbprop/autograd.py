"""The autograd Function that ties a penalty's value to the gradients computed by the passes."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import engine
from .penalties import Penalty
from .program import Program


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


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
    exist only there) with per-sample weights ``1/B`` ("mean") or ``1``; ``backward`` scales them by the
    incoming gradient. For ``reduction="none"`` with non-uniform incoming per-sample weights, the
    parameter gradients are recomputed from the saved forward pass with those weights (exact).

    Autograd semantics: the gradients and the inputs go through ``save_for_backward``, so a second
    ``backward()`` without ``retain_graph=True`` raises like any other graph, a parameter (or ``x``)
    modified in place between the call and ``backward()`` raises autograd's version-counter error (the
    gradients belong to the old values), saved-tensor hooks see them, and differentiating the gradient
    again raises ``SECOND_DERIVATIVE_ERROR`` when that is attempted. A call with gradients enabled pays for
    the gradients even if ``backward()`` never comes; evaluate under ``torch.no_grad()`` for the value alone.
    """

    @staticmethod
    def forward(ctx, spec, x: Tensor, *params: Tensor) -> Tensor:
        program, head, reduction, chunk_size, backend, update_stats = spec
        B = x.shape[0]
        need_x = ctx.needs_input_grad[1]
        need_params = any(ctx.needs_input_grad[2:])
        weight = 1.0 / B if reduction == "mean" else 1.0
        keep_fp = reduction == "none" and (need_params or need_x)  # exact recompute for non-uniform weights
        result = engine.run(program, head, x, sample_weight=weight, need_param_grads=need_params,
                            need_input_grad=need_x, chunk_size=chunk_size, keep_fp=keep_fp, backend=backend,
                            update_stats=update_stats)
        ctx.reduction, ctx.num_params = reduction, len(params)
        ctx.save_for_backward(x, *params, result.input_grad, *(result.param_grads or [None] * len(params)))
        ctx.recompute = (program, head, chunk_size, result.fp, backend) if keep_fp else None
        return reduce(result.value, reduction)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_output: Tensor):
        saved = ctx.saved_tensors  # raises if freed by an earlier backward, or if an input changed in place
        L = ctx.num_params
        x, input_grad, param_grads = saved[0], saved[1 + L], list(saved[2 + L:])
        if ctx.reduction != "none":
            scale = grad_output
            input_grad = None if input_grad is None else input_grad * scale
        else:
            g = grad_output
            scale = g[0]
            if input_grad is not None:
                input_grad = input_grad * scale
            if ctx.recompute is not None and not bool((g == g[0]).all()):
                # ∇ Σ_b g_b R_b from the saved forward pass: exact also where samples are coupled (train BN)
                program, head, chunk_size, fp, backend = ctx.recompute
                need_x = input_grad is not None
                r = engine.run(program, head, x, sample_weight=g, need_param_grads=any(p is not None for p in
                                                                                        param_grads),
                               need_input_grad=need_x, chunk_size=chunk_size, fp=fp, backend=backend)
                param_grads = r.param_grads or param_grads
                input_grad = r.input_grad if need_x else None
                scale = None
        grads = [None if p is None else (p if scale is None else p * scale) for p in param_grads]
        return (None, input_grad, *grads)


def evaluate(program: Program, head: Penalty, x: Tensor, reduction: str, chunk_size: Optional[int],
             backend: str = "python", update_stats: bool = False) -> Tensor:
    """The penalty through the passes: a plain value when no gradient is wanted, else via the Function.
    ``update_stats``: BatchNorm running statistics are updated as by one ``model(x)`` call."""
    params = program.parameters()
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return DoubleBackpropFunction.apply((program, head, reduction, chunk_size, backend, update_stats), x, *params)
    return reduce(engine.run(program, head, x, chunk_size=chunk_size, backend=backend,
                             update_stats=update_stats).value, reduction)
