"""Autograd double backpropagation (``create_graph=True``) for any model: the fallback for models that
``compile_model`` rejects, and the float64 oracle of the tests. Same penalties, same conventions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .penalties import Penalty
from .ir import as_output_matrix


class AutogradJacobian:
    """``vjp``/``jvp`` of the output map by autograd (``jvp`` by the double-vjp trick)."""

    def __init__(self, head: Penalty, o: Tensor, x: Tensor) -> None:
        self.head, self.o, self.x = head, o, x

    def vjp(self, v: Tensor) -> Tensor:
        s = (self.head.output_map(self.o) * v).sum()
        return torch.autograd.grad(s, self.x, retain_graph=True)[0].detach()

    def jvp(self, u: Tensor) -> Tensor:
        out = self.head.output_map(self.o)
        dummy = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad((out * dummy).sum(), self.x, create_graph=True)[0]
        return torch.autograd.grad(g, dummy, u)[0].detach()


def autograd_penalty(model: nn.Module, head: Penalty, x: Tensor, update_stats: Optional[bool] = None) -> Tensor:
    """Per-sample ``R_b`` (shape ``(B,)``), differentiable in the parameters and in ``x``.

    Input gradients come from one batched ``autograd.grad`` per direction of the batch-summed output: the
    per-sample gradients for models whose samples do not interact, ∇x of the batch sum for train-mode
    BatchNorm (docs/maths.md §7). BatchNorm running statistics are updated, as one ``model(x)`` call would,
    when ``update_stats`` (default: for penalties that replace the task forward, ``head.has_loss``).
    """
    if update_stats is None:
        update_stats = head.has_loss
    buffers = [] if update_stats else [(b, b.clone()) for b in model.buffers()]
    with torch.enable_grad():
        x_ = x if x.requires_grad else x.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # torch's fused attention kernels have no double backward
            o = as_output_matrix(model(x_))
        for b, v in buffers:  # untracked by autograd (train-mode BN saves but never reads them in backward)
            if not torch.equal(b, v):
                b.data.copy_(v)
        head.setup(o.detach(), x_.detach(), AutogradJacobian(head, o, x_))
        value = head.loss_value(o) if head.has_loss else o.new_zeros(o.shape[0])
        for i in range(head.num_directions):
            v = head.directions(i, i + 1)
            s = head.output_functional(o, v[0]).sum()
            xi = torch.autograd.grad(s, x_, create_graph=True)[0]
            value = value + head.value(xi[None], x_)[0]
    return value
