"""The native backend: element kernels for the DAG driver, the native chain driver (one call per pass for
plain chains), Algorithm 4 in one call, and the penalty heads."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from . import native_ops
from .backends import native_module
from .nodes import Affine
from .passes import ParamGrads
from .program import Program


class NativeKernels:
    """The element work of the DAG nodes in the extension's kernels (csrc/kernels): derivative masks packed
    to one bit per element, ``g'`` and ``g''`` of smooth activations from the shared element bodies."""

    name = "native"

    def piecewise_forward(self, z: Tensor, act):
        zc = z.contiguous()
        if act.hi == math.inf:  # (leaky) ReLU: g, and the bits of z > 0, in one pass
            y, bits = native_ops.forward_epilogue(zc, None, 1, 1, act.slope)
        else:                   # ReLU6 / Hardtanh: bits of lo < z < hi
            y = act.fn(z)
            bits = native_ops.pack_positive(((zc > act.lo) & (zc < act.hi)).to(torch.uint8).view(-1))
        return y, (bits, z.numel())

    def mask_multiply(self, c: Tensor, saved, act) -> Tensor:
        bits, numel = saved
        return native_ops.mask_multiply(c.contiguous(), bits, numel, act.slope)

    def smooth_forward(self, z: Tensor, act):
        return act.fn(z), z.contiguous()

    def smooth_multiply(self, c: Tensor, z: Tensor, act) -> Tensor:
        return native_ops.activation_derivative_multiply(c.contiguous(), z, act.name, act.p1, act.p2)

    def smooth_source(self, xi: Tensor, q: Tensor, z: Tensor, act) -> Tensor:
        return native_ops.activation_source(xi.contiguous(), q.contiguous(), z, act.name, act.p1, act.p2)

    # Train-mode BatchNorm (docs/maths.md §4.9; csrc/kernels/batchnorm.h): one reduction pass for the moments
    # of every (copy, channel), then one elementwise pass per output. Per-channel vectors are brought to the
    # tangent's dtype (a no-op unless parameters and activations differ in precision).
    def batchnorm_train_linear(self, q: Tensor, xhat: Tensor, scale: Tensor) -> Tensor:
        return native_ops.batchnorm_train_linear(q.contiguous(), xhat.contiguous(),
                                                 scale.detach().to(q.dtype).contiguous())

    def batchnorm_train_bbp(self, xi: Optional[Tensor], q: Tensor, xhat: Tensor, invstd: Tensor,
                            gamma: Optional[Tensor], need_tangent: bool, want_source: bool, want_mixed: bool):
        tangent, source, dgamma = native_ops.batchnorm_train_bbp(
            None if xi is None else xi.contiguous(), q.contiguous(), xhat.contiguous(),
            invstd.to(q.dtype).contiguous(), None if gamma is None else gamma.detach().to(q.dtype).contiguous(),
            need_tangent, want_source, want_mixed)
        if dgamma is not None and gamma is not None:
            dgamma = dgamma.to(gamma.dtype)
        return tangent, source, dgamma


class ChainPasses:
    """The passes of a plain chain through the native chain driver (csrc/passes.cpp): one call per pass.
    Chains of these kinds have no second-order sources."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.affine = [n for n, op in enumerate(program.ops) if isinstance(op, Affine)]

    def _lists(self, grads: Optional[ParamGrads]):
        """``(want_weight, want_bias, weight accumulators, bias accumulators)`` per affine node."""
        L = len(self.affine)
        if grads is None:
            return [False] * L, [False] * L, [None] * L, [None] * L
        want = [grads.want(n) + [False] for n in self.affine]
        return [w[0] for w in want], [w[1] for w in want], [None] * L, [None] * L

    def _add(self, grads: Optional[ParamGrads], weights, biases=None) -> None:
        if grads is None:
            return
        for j, n in enumerate(self.affine):
            grads.add_node(n, [weights[j], None if biases is None else biases[j]])

    def forward(self, x: Tensor, keep_inputs: bool, update_stats: bool = False):
        return native_module().forward(self.program.native(), x, keep_inputs)

    def backward(self, fp, zeta_L: Tensor, keep: bool, keep_nodes=None):
        return native_module().backward(self.program.native(), fp, zeta_L, keep)

    def nodes_with_second_order_terms(self, grads: Optional[ParamGrads], with_sources: bool) -> set:
        return {n for n in self.affine if grads is not None and any(grads.want(n))}

    def backward_backward(self, fp, q0: Tensor, kept, theta_hat: Optional[ParamGrads], sources, need_h: bool):
        want_w, _, acc_w, _ = self._lists(theta_hat)
        if isinstance(kept, dict):  # no ζ kept (tangent pass)
            kept = [kept.get(i) for i in range(len(self.program.ops))]
        h, acc_w = native_module().backward_backward(self.program.native(), fp, q0, kept, acc_w, want_w, need_h)
        self._add(theta_hat, acc_w)
        return h

    def forward_backward(self, fp, eta_L: Optional[Tensor], sources, grads: Optional[ParamGrads],
                         need_input_grad: bool) -> Optional[Tensor]:
        assert not sources, "chains of the native chain kinds have no second-order sources"
        want_w, want_b, acc_w, acc_b = self._lists(grads)
        gamma0, acc_w, acc_b = native_module().forward_backward(self.program.native(), fp, eta_L.contiguous(), acc_w,
                                                                acc_b, want_w, want_b, need_input_grad)
        self._add(grads, acc_w, acc_b)
        return gamma0


def chain_num_classes(program: Program) -> int:
    """The output width of a chain program (its last affine node's output features/channels)."""
    return program.ops[ChainPasses(program).affine[-1]].params()[0].shape[0]


def jacobian_penalty(program: Program, fp, x: Tensor, softmax: bool, chunks: List[int], cap: int, time_chunks: bool,
                     directions: Optional[Tensor], scale: float, sample_weight: Tensor, grads: Optional[ParamGrads],
                     need_input_grad: bool):
    """Algorithm 4 in one native call from the chain's forward state ``fp`` (``ChainPasses.forward``), classes in
    chunks of the sizes ``chunks`` (the last one repeated, none above ``cap``: ``engine.chunk_cap``); fills
    ``grads`` and returns ``(values, input_grad, chunk sizes, chunk seconds)`` (seconds only if ``time_chunks``)."""
    chain = ChainPasses(program)
    want_w, want_b, _, _ = chain._lists(grads)
    value, gw, gb, gx, sizes, seconds = native_module().jacobian_penalty(
        program.native(), fp, x, softmax, chunks, cap, time_chunks, directions, scale, sample_weight, want_w, want_b,
        need_input_grad)
    chain._add(grads, gw, gb)
    return value, gx, sizes, seconds


def penalty_head(head, xi: Tensor, x: Tensor, weight: Tensor, want_q0: bool, want_input_grad: bool):
    """``(Σ_k p(ξ_k), w ∇p, Σ_k w ∂p/∂x)`` of ``head`` in the native kernel; ``xi`` is ``(k, B, ...)``."""
    name, p1, p2 = head.native_head
    k, B = xi.shape[:2]
    acc = torch.float64 if xi.dtype == torch.float64 else torch.float32
    value = torch.zeros(B, dtype=acc, device=xi.device)
    x2 = x.detach().reshape(B, -1).contiguous()
    q0, gx = native_ops.penalty_head(xi.reshape(k, B, -1).contiguous(), x2, name, p1, p2, weight.contiguous(),
                                     value, want_q0, want_input_grad)
    return (value.to(xi.dtype), None if q0 is None else q0.view(xi.shape),
            None if gx is None else gx.view(x.shape))
