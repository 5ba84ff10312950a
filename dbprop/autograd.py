"""The autograd Function that ties a penalty's value to the gradients computed by the passes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import engine
from .penalties import Penalty
from .program import Program


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


class DoubleBackpropFunction(torch.autograd.Function):
    """``R = reduce(R_b)`` whose backward returns ``∇x R`` and ``∇θ R`` for every parameter.

    The gradients are computed eagerly in ``forward`` (Algorithm 4 needs the per-class cotangents that
    exist only there) with per-sample weights ``1/B`` ("mean") or ``1``; ``backward`` scales them by the
    incoming gradient. For ``reduction="none"`` with non-uniform incoming per-sample weights, the
    parameter gradients are recomputed from the saved forward pass with those weights (exact).
    """

    @staticmethod
    def forward(ctx, spec, x: Tensor, *params: Tensor) -> Tensor:
        program, head, reduction, chunk_size, backend, update_stats = spec
        B = x.shape[0]
        need_x = ctx.needs_input_grad[1]
        need_params = any(ctx.needs_input_grad[2:])
        weight = 1.0 / B if reduction == "mean" else 1.0
        keep_fp = reduction == "none" and need_params  # for an exact recompute with non-uniform weights
        result = engine.run(program, head, x, sample_weight=weight, need_param_grads=need_params,
                            need_input_grad=need_x, chunk_size=chunk_size, keep_fp=keep_fp, backend=backend,
                            update_stats=update_stats)
        ctx.reduction = reduction
        ctx.param_grads = result.param_grads or [None] * len(params)
        ctx.input_grad = result.input_grad
        ctx.recompute = (program, head, x, chunk_size, result.fp, backend) if keep_fp else None
        return reduce(result.value, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        param_grads = ctx.param_grads
        if ctx.reduction != "none":
            scale = grad_output
            input_grad = None if ctx.input_grad is None else ctx.input_grad * scale
        else:
            g = grad_output
            if ctx.input_grad is not None:
                input_grad = ctx.input_grad * g.view(-1, *([1] * (ctx.input_grad.dim() - 1)))
            else:
                input_grad = None
            scale = g[0]
            if ctx.recompute is not None and not bool((g == g[0]).all()):
                program, head, x, chunk_size, fp, backend = ctx.recompute
                param_grads = engine.run(program, head, x, sample_weight=g, need_param_grads=True,
                                         chunk_size=chunk_size, fp=fp, backend=backend).param_grads
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
