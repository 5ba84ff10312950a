"""Algorithm 4 (DESIGN.md §4), generalised to every penalty of §3: one forward pass, then per chunk of
directions a batched backward and backward-backward pass, and at most ONE forward-backward pass from the
accumulated ``η̂_L`` (none at all when ``η ≡ 0``, i.e. logits outputs with constant ``v``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import Tensor

from . import native, passes
from .passes import ForwardState, ParamGrads
from .penalties import JacobianFrobenius, Penalty, _bcast
from .program import Program

#: memory the class chunks may use for their cotangents when ``chunk_size=None``
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2 ** 20


@dataclass
class Result:
    value: Tensor                            # per-sample R_b, shape (B,)
    param_grads: Optional[List[Optional[Tensor]]]  # aligned with program.parameters()
    input_grad: Optional[Tensor]             # per-sample ∇x R_b (times its weight), shape of x
    fp: ForwardState


class PassJacobian:
    """``vjp``/``jvp`` of the model's output map through the passes (for power iterations)."""

    def __init__(self, P, program: Program, fp: ForwardState, head: Penalty) -> None:
        self.P, self.program, self.fp, self.head = P, program, fp, head

    def vjp(self, v: Tensor) -> Tensor:
        return self.P.backward(self.program, self.fp, self.head.output_cotangent(v), keep_zetas=False)[0]

    def jvp(self, u: Tensor) -> Tensor:
        return self.head.output_tangent(self.P.backward_backward(self.program, self.fp, u, {}, None, need_h=True))


def default_chunk_size(fp: ForwardState, num_directions: int, batch: int) -> int:
    """Directions per batched pass: all of them if their cotangents fit the budget, fewer otherwise."""
    per_direction = 2 * batch * fp.numel_per_sample * fp.output.element_size()
    return max(1, min(num_directions, DEFAULT_CHUNK_BUDGET_BYTES // max(1, per_direction)))


def _accumulate(total: Optional[Tensor], term: Tensor) -> Tensor:
    return term if total is None else total + term


@torch.no_grad()
def run(program: Program, head: Penalty, x: Tensor, *, sample_weight: Union[float, Tensor] = 1.0,
        need_param_grads: bool = False, need_input_grad: bool = False, chunk_size: Optional[int] = None,
        fp: Optional[ForwardState] = None, keep_fp: bool = False, backend: str = "python") -> Result:
    """Per-sample penalty values and, if asked, the gradients of ``Σ_b w_b R_b``.

    ``sample_weight`` ``w`` scales ``q_0`` (and the loss cotangent) per sample; parameter gradients are
    summed over the batch, the input gradient stays per sample. ``fp`` reuses an earlier forward pass;
    ``keep_fp`` asks for the forward state in the result. ``backend``: "python" or "native" passes.
    """
    need_any = need_param_grads or need_input_grad
    grads = ParamGrads(program) if need_param_grads else None
    B = x.shape[0]
    w = torch.as_tensor(sample_weight, dtype=x.dtype, device=x.device).expand(B).reshape(1, B)
    if (backend == "native" and fp is None and not keep_fp and isinstance(head, JacobianFrobenius)
            and head.estimator == "exact"):  # Algorithm 4 in one native call
        value, input_grad = native.jacobian_penalty(program, x, head.output == "softmax", chunk_size or 0,
                                                    DEFAULT_CHUNK_BUDGET_BYTES, None, 1.0, w[0].contiguous(), grads,
                                                    need_input_grad)
        return Result(value, grads.as_list() if grads else None, input_grad, None)
    P = native if backend == "native" else passes
    fbp = need_any and head.has_eta
    if fp is None:
        fp = P.forward(program, x, keep_inputs=fbp and bool(grads))
    o = fp.output
    if not head.ready:
        head.setup(o, x, PassJacobian(P, program, fp, head))
    value = head.loss_value(o) if head.has_loss else o.new_zeros(B)
    input_grad: Optional[Tensor] = None
    eta_L: Optional[Tensor] = None
    n = head.num_directions
    k = chunk_size or default_chunk_size(fp, n, B)
    for start in range(0, n, k):
        v = head.directions(start, min(n, start + k))
        kk = v.shape[0]
        zeta_L = head.output_cotangent(v)                                      # ζ_L, (k, B, C)
        xi, zetas = P.backward(program, fp, zeta_L.flatten(0, 1), keep_zetas=bool(grads))
        xi = xi.unflatten(0, (kk, B))                                          # ξ_0, (k, B, ...)
        if P is native and head.native_head is not None:                     # p, q_0, ∂p/∂x in one kernel
            want_direct = need_input_grad and head.reads_x
            p, q0, direct = native.penalty_head(head, xi, x, w[0], need_any, want_direct)
            value += p
            if want_direct:
                input_grad = _accumulate(input_grad, direct)
        else:
            value += head.value(xi, x).sum(0)
            q0 = direct = None
        if not need_any:
            continue
        if head.has_loss:  # ∇θ ℓ = K□(ζ_j, x_{j-1}): w ζ_L joins η̂_L, one recursion carries both
            eta_L = _accumulate(eta_L, (_bcast(w, zeta_L) * zeta_L).sum(0))
        if q0 is None:
            q0 = head.q0(xi, x) * _bcast(w, xi)                                # q_0 = w ∇p(ξ_0)
            if need_input_grad:
                direct = head.input_grad(xi, x)
                if direct is not None:
                    input_grad = _accumulate(input_grad, (direct * _bcast(w, xi)).sum(0))
        if grads or head.has_eta:
            h = P.backward_backward(program, fp, q0.flatten(0, 1), zetas, grads, need_h=head.has_eta)
            if head.has_eta:                                                   # η̂_L += Σ_i η_L^{(i)}
                eta_L = _accumulate(eta_L, head.output_eta(v, h.unflatten(0, (kk, B))))
        del zetas
    if fbp and eta_L is not None:                                              # FBP once, from η̂_L
        gamma0 = P.forward_backward(program, fp, eta_L, grads, need_input_grad)
        if need_input_grad:
            input_grad = _accumulate(input_grad, gamma0)
    if need_input_grad and input_grad is None:  # logits, constant v, p without x: ∇x R = 0 a.e.
        input_grad = torch.zeros_like(x)
    return Result(value, grads.as_list() if grads else None, input_grad, fp)
