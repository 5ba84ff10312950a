"""The native element kernels as dispatcher operators ``torch.ops.dbprop.*``.

Their schemas, argument checks and CPU / CUDA kernels are registered in C++ (``csrc/ops.cpp``, loaded with
``dbprop._C``); the C++ pass drivers call them through the dispatcher as well. This module holds what the
dispatcher needs from Python and what Python callers use:

* a fake (meta) kernel per operator, so that the operators can be traced (``torch.compile``, ``FakeTensorMode``)
  and checked with ``torch.library.opcheck``;
* thin typed wrappers, which turn the outputs not asked for (empty tensors in the schemas) into ``None``.

The operators are the passes' derivative computations and are not differentiable themselves: an argument that
requires grad (grad mode on) is refused; under ``torch.no_grad()`` they run (C++ Autograd kernel, which also bumps
the version of the tensors they write). Call :func:`register_fakes` once after loading the extension
(``dbprop.backends`` does).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

def _packed(like: Tensor, numel: int) -> Tensor:
    """The packed bits of ``numel`` elements: one uint8 per 8."""
    return like.new_empty(((numel + 7) // 8,), dtype=torch.uint8)


def _none(like: Tensor) -> Tensor:
    """An output not asked for (empty in the schema)."""
    return like.new_empty((0,))


_registered = False


def register_fakes() -> None:
    """Register the fake kernels (once; the extension must be loaded)."""
    global _registered
    if _registered:
        return
    fake = torch.library.register_fake

    @fake("dbprop::forward_epilogue")
    def _(z, bias, channels, inner, slope):
        return torch.empty_like(z), _packed(z, z.numel())

    @fake("dbprop::pack_positive")
    def _(t):
        return _packed(t, t.numel())

    @fake("dbprop::mask_multiply")
    def _(c, bits, mask_numel, slope):
        return torch.empty_like(c)

    @fake("dbprop::mask_multiply_bias_grad")
    def _(c, bits, mask_numel, slope, channels, inner):
        return torch.empty_like(c), c.new_empty((channels,))

    @fake("dbprop::softmax_cotangent")
    def _(probs, directions):
        return torch.empty_like(directions)

    @fake("dbprop::softmax_eta_accumulate")
    def _(probs, directions, h, eta):
        return None

    @fake("dbprop::penalty_head")
    def _(xi, x, head, p1, p2, weight, value, want_q0, want_input_grad):
        q0 = torch.empty_like(xi) if want_q0 else _none(xi)
        return q0, xi.new_empty(xi.shape[1:]) if want_input_grad else _none(xi)

    @fake("dbprop::activation_derivative_multiply")
    def _(c, z, activation, p1, p2):
        return torch.empty_like(c)

    @fake("dbprop::activation_source")
    def _(xi, q, z, activation, p1, p2):
        return torch.empty_like(z)

    @fake("dbprop::batchnorm_train_linear")
    def _(q, xhat, scale):
        return torch.empty_like(q)

    @fake("dbprop::batchnorm_train_bbp")
    def _(xi, q, xhat, invstd, gamma, need_tangent, want_source, want_mixed):
        if not (need_tangent or want_source or want_mixed):
            return _none(q), _none(q), _none(q)
        return (torch.empty_like(q) if need_tangent else _none(q),
                torch.empty_like(xhat) if want_source else _none(q),
                xhat.new_empty(xhat.shape[1:2]) if want_mixed else _none(q))

    _registered = True


# ---- typed wrappers (documentation of each operator: csrc/ops.h) -------------------------------------------------

def forward_epilogue(z: Tensor, bias: Optional[Tensor], channels: int, inner: int,
                     slope: float) -> Tuple[Tensor, Tensor]:
    """``(g(z + b), packed bits of [z + b > 0])`` for the (leaky) ReLU of slope ``slope``."""
    return torch.ops.dbprop.forward_epilogue(z, bias, channels, inner, slope)


def pack_positive(t: Tensor) -> Tensor:
    """The packed bits of ``[t > 0]`` for a contiguous uint8 ``t``."""
    return torch.ops.dbprop.pack_positive(t)


def mask_multiply(c: Tensor, bits: Tensor, mask_numel: int, slope: float) -> Tensor:
    """``a ⊙ c`` for the packed mask ``bits`` of ``mask_numel`` elements, ``c`` holding k copies of its batch."""
    return torch.ops.dbprop.mask_multiply(c, bits, mask_numel, slope)


def mask_multiply_bias_grad(c: Tensor, bits: Tensor, mask_numel: int, slope: float, channels: int,
                            inner: int) -> Tuple[Tensor, Tensor]:
    """``(a ⊙ c, Σ_{rows, inner} a ⊙ c per channel)``."""
    return torch.ops.dbprop.mask_multiply_bias_grad(c, bits, mask_numel, slope, channels, inner)


def softmax_cotangent(probs: Tensor, directions: Tensor) -> Tensor:
    """``ζ_L = S v`` for k directions ``(k, B, C)`` at the probabilities ``(B, C)``."""
    return torch.ops.dbprop.softmax_cotangent(probs, directions)


def softmax_eta_accumulate(probs: Tensor, directions: Tensor, h: Tensor, eta: Tensor) -> Tensor:
    """``eta += Σ_k (3.15)(probs, v_k, h_k)`` in place; returns ``eta``."""
    torch.ops.dbprop.softmax_eta_accumulate(probs, directions, h, eta)
    return eta


def penalty_head(xi: Tensor, x: Optional[Tensor], head: str, p1: float, p2: float, weight: Tensor, value: Tensor,
                 want_q0: bool, want_input_grad: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``value += Σ_k p(ξ_k)`` in place for the head named ``head``; returns ``(q_0, Σ_k w ∂p/∂x)``, each
    ``None`` unless asked for."""
    q0, gx = torch.ops.dbprop.penalty_head(xi, x, head, p1, p2, weight, value, want_q0, want_input_grad)
    return (q0 if want_q0 else None), (gx if want_input_grad else None)


def activation_derivative_multiply(c: Tensor, z: Tensor, activation: str, p1: float, p2: float) -> Tensor:
    """``g'(z) ⊙ c`` for the smooth activation named ``activation``, ``c`` holding k copies of ``z``."""
    return torch.ops.dbprop.activation_derivative_multiply(c, z, activation, p1, p2)


def activation_source(xi: Tensor, q: Tensor, z: Tensor, activation: str, p1: float, p2: float) -> Tensor:
    """``Σ_copies g''(z) ⊙ ξ ⊙ q`` (shape of ``z``)."""
    return torch.ops.dbprop.activation_source(xi, q, z, activation, p1, p2)


def batchnorm_train_linear(q: Tensor, xhat: Tensor, scale: Tensor) -> Tensor:
    """``A q`` of a train-mode BatchNorm (docs/maths.md (4.3)), per copy and channel."""
    return torch.ops.dbprop.batchnorm_train_linear(q, xhat, scale)


def batchnorm_train_bbp(xi: Optional[Tensor], q: Tensor, xhat: Tensor, invstd: Tensor, gamma: Optional[Tensor],
                        need_tangent: bool, want_source: bool,
                        want_mixed: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(A q, ŝ, θ̂_γ)`` of a train-mode BatchNorm (docs/maths.md (4.3), (4.6), (4.5)), each ``None`` unless asked."""
    tangent, source, dgamma = torch.ops.dbprop.batchnorm_train_bbp(xi, q, xhat, invstd, gamma, need_tangent,
                                                                   want_source, want_mixed)
    return (tangent if need_tangent else None, source if want_source else None, dgamma if want_mixed else None)
