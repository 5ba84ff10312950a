"""The four passes through the native extension: the same interface as :mod:`dbprop.passes`, each pass one
call into ``dbprop._C`` over the whole program (so no Python runs per layer)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import native_module
from .passes import ParamGrads
from .program import Program


def _per_affine(program: Program, grads: Optional[ParamGrads]):
    """``(want_weight, want_bias, weight accumulators, bias accumulators)`` per affine op; nothing wanted
    without ``grads``."""
    if grads is not None:
        return grads.per_affine()
    n = len(program.affine_indices)
    return [False] * n, [False] * n, [None] * n, [None] * n


def forward(program: Program, x: Tensor, keep_inputs: bool):
    return native_module().forward(program.native(), x, keep_inputs)


def backward(program: Program, fp, zeta_L: Tensor, keep_zetas: bool):
    return native_module().backward(program.native(), fp, zeta_L, keep_zetas)


def backward_backward(program: Program, fp, q0: Tensor, zetas, theta_hat: Optional[ParamGrads],
                      need_h: bool) -> Optional[Tensor]:
    want_w, _, acc_w, _ = _per_affine(program, theta_hat)
    if isinstance(zetas, dict):  # no ζ kept (tangent pass)
        zetas = [zetas.get(i) for i in range(len(program.ops))]
    h, acc_w = native_module().backward_backward(program.native(), fp, q0, zetas, acc_w, want_w, need_h)
    if theta_hat is not None:
        theta_hat.set_per_affine(acc_w)
    return h


def forward_backward(program: Program, fp, eta_L: Tensor, grads: Optional[ParamGrads],
                     need_input_grad: bool) -> Optional[Tensor]:
    want_w, want_b, acc_w, acc_b = _per_affine(program, grads)
    gamma0, acc_w, acc_b = native_module().forward_backward(program.native(), fp, eta_L.contiguous(), acc_w, acc_b,
                                                            want_w, want_b, need_input_grad)
    if grads is not None:
        grads.set_per_affine(acc_w, acc_b)
    return gamma0


def jacobian_penalty(program: Program, x: Tensor, softmax: bool, chunk: int, chunk_budget: int,
                     directions: Optional[Tensor], scale: float, sample_weight: Tensor, grads: Optional[ParamGrads],
                     need_input_grad: bool):
    """Algorithm 4 in one native call (``chunk=0``: sized to ``chunk_budget`` bytes); fills ``grads`` and
    returns ``(values, input_grad)``."""
    want_w, want_b, _, _ = _per_affine(program, grads)
    value, gw, gb, gx = native_module().jacobian_penalty(program.native(), x, softmax, chunk, chunk_budget,
                                                         directions, scale, sample_weight, want_w, want_b,
                                                         need_input_grad)
    if grads is not None:
        grads.set_per_affine(gw, gb)
    return value, gx


def penalty_head(head, xi: Tensor, x: Tensor, weight: Tensor, want_q0: bool, want_input_grad: bool):
    """``(Σ_k p(ξ_k), w ∇p, Σ_k w ∂p/∂x)`` of ``head`` in the native kernel; ``xi`` is ``(k, B, ...)``."""
    kind, p1, p2 = head.native_head
    k, B = xi.shape[:2]
    acc = torch.float64 if xi.dtype == torch.float64 else torch.float32
    value = torch.zeros(B, dtype=acc, device=xi.device)
    x2 = x.detach().reshape(B, -1).contiguous()
    value, q0, gx = native_module().penalty_head(xi.reshape(k, B, -1).contiguous(), x2, kind, p1, p2,
                                                 weight.contiguous(), value, want_q0, want_input_grad)
    return (value.to(xi.dtype), None if q0 is None else q0.view(xi.shape),
            None if gx is None else gx.view(x.shape))
