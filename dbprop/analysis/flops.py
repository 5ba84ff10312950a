"""Operation counts: FLOPs measured with torch.utils.flop_counter (a TorchDispatchMode counting
convolution, convolution_backward by output mask, and matrix products), and the analytic counts of
docs/maths.md §8 for the exact Jacobian penalty."""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..nodes import Conv, Linear, PythonKernels, RunContext
from ..program import compile_model


class FlopCounter(TorchDispatchMode):
    """Sums torch.utils.flop_counter's formulas over every ATen op dispatched inside the mode.

    (``FlopCounterMode`` itself also installs module hooks that break ``autograd.grad`` on leaves.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            # below autograd (inside the native pass drivers) composite ops such as linear and matmul reach the
            # mode undecomposed: count what they decompose into (as torch.utils.flop_counter does)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn()`` runs (forward and any backward it triggers)."""
    with FlopCounter() as mode:
        fn()
    return mode.total


def layer_costs(model: nn.Module, x: Tensor) -> List[int]:
    """FLOPs of each ``K_j(θ_j, x_{j-1})`` at the batch of ``x`` (equal to those of ``Kᵀ_j`` and ``K□_j``)."""
    program = compile_model(model)
    if not program.is_chain:
        raise ValueError("layer_costs counts the affine stages of chain programs")
    costs = []
    ctx = RunContext(PythonKernels(), False, False, x.shape[0])
    with torch.no_grad():
        for op in program.ops:
            y, _ = op.run([x], ctx)
            if isinstance(op, Linear):
                costs.append(2 * (x.numel() // x.shape[-1]) * op.weight.numel())
            elif isinstance(op, Conv):
                costs.append(2 * y.shape[0] * op.weight.numel() * math.prod(y.shape[2:]))
            x = y
    return costs


def jacobian_penalty_flops(costs: List[int], num_classes: int, output: str = "logits") -> Dict[str, int]:
    """Analytic FLOPs of the exact Jacobian penalty with parameter gradients (``x`` not requiring grad).

    dbprop (Algorithm 4): FP ``Σc``; per class BP ``Σc``, BBP ``K_j`` for ``j < L`` (all ``j`` for softmax) and
    ``K□_j`` for all ``j``; softmax only: one FBP with ``Kᵀ_j`` for ``j ≥ 2`` and ``K□_j`` for all ``j``.
    With unit costs this is ``3CL + L − C`` (logits) and ``3CL + 3L − 1`` (softmax).
    ``naive``: per-class double backprop with every pass, ``5CL + L − C`` in unit costs.
    """
    C, total, last = num_classes, sum(costs), costs[-1]
    dbprop = total + C * (total + (total - last) + total)
    if output == "softmax":
        dbprop += C * last + (total - costs[0]) + total
    naive = total + C * (total + total + (total - costs[0]) + 2 * total)  # BP, BBP, FBP, 2× K□
    return {"dbprop": dbprop, "naive": naive}
