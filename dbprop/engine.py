"""Algorithm 4 on DAG programs (docs/maths.md §6), generalised to every penalty of §5: one forward pass, then per
chunk of directions a batched backward and backward-backward pass, and at most ONE forward-backward pass from the
accumulated ``η̂_L`` and sources ``ŝ`` (none at all when both vanish: logits outputs with constant ``v`` on programs
without second-order sources)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import Tensor

from . import memory, native, parametrized, passes
from .nodes import PythonKernels
from .passes import ForwardState, ParamGrads
from .penalties import JacobianFrobenius, Penalty, _bcast
from .program import Program
from .tuning import ChunkTimer

#: memory the class chunks may use for their cotangents when ``chunk_size=None`` (dbprop/tuning.py picks the
#: fastest size within it): as much as the parameters and the forward state take, plus a small floor, at most
#: the maximum; so the default uses at most about twice the memory of ``chunk_size=1``, also at C = 1000
CHUNK_BUDGET_MAX_BYTES = 256 * 2 ** 20
CHUNK_BUDGET_FLOOR_BYTES = 8 * 2 ** 20


@dataclass
class Result:
    value: Tensor                            # per-sample R_b, shape (B,)
    param_grads: Optional[List[Optional[Tensor]]]  # aligned with program.ir.params (Program.gradients maps them)
    input_grad: Optional[Tensor]             # per-sample ∇x R_b (times its weight), shape of x
    fp: ForwardState


class PassJacobian:
    """``vjp``/``jvp`` of the model's output map through the passes (for power iterations)."""

    def __init__(self, P, fp, head: Penalty) -> None:
        self.P, self.fp, self.head = P, fp, head

    def vjp(self, v: Tensor) -> Tensor:
        return self.P.backward(self.fp, self.head.output_cotangent(v), keep=False)[0]

    def jvp(self, u: Tensor) -> Tensor:
        return self.head.output_tangent(self.P.backward_backward(self.fp, u, {}, None, None, need_h=True))


def make_passes(program: Program, backend: str):
    """The pass driver for ``backend``: the native chain driver (one C++ call per pass) for plain chains of
    its kinds, else the DAG driver with the native or the Python element kernels."""
    if backend == "native":
        return native.ChainPasses(program) if program.native_chain else \
            passes.Passes(program.ir, native.NativeKernels())
    return passes.Passes(program.ir, PythonKernels())


def chunk_budget_base(program: Program) -> int:
    """The budget's part that does not depend on the input: the floor plus the parameters' bytes."""
    return CHUNK_BUDGET_FLOOR_BYTES + sum(p.numel() * p.element_size() for p in program.parameters())


def chunk_cap(program: Program, fp, num_directions: int, batch: int) -> int:
    """The most directions per batched pass whose cotangents (two state-sized tensors per direction) fit
    ``min(CHUNK_BUDGET_MAX_BYTES, chunk_budget_base + bytes of the forward state)``: the one memory budget, also of
    the native Algorithm 4 (``fp``: a :class:`ForwardState` or the native chain's, both with ``output`` and
    ``numel_per_sample``)."""
    state = batch * fp.numel_per_sample * fp.output.element_size()
    budget = min(CHUNK_BUDGET_MAX_BYTES, chunk_budget_base(program) + state)
    return max(1, min(num_directions, budget // max(1, 2 * state)))


def _tuning_key(head: Penalty, x: Tensor, n: int, *flags) -> tuple:
    return (type(head).__name__, head.output, n, tuple(x.shape), x.dtype, str(x.device), *flags)


def _chunks(schedule: List[int], n: int, cap: int):
    """``(start, size)`` of each batched pass: ``schedule`` in order, its last size repeated, none above ``cap``."""
    start, i = 0, 0
    while start < n:
        k = min(schedule[min(i, len(schedule) - 1)], cap, n - start)
        yield start, k
        start, i = start + k, i + 1


def _accumulate(total: Optional[Tensor], term: Tensor) -> Tensor:
    return term if total is None else total + term


def run(program: Program, head: Penalty, x: Tensor, **options) -> Result:
    """Per-sample penalty values and, if asked, the gradients of ``Σ_b w_b R_b`` (docs/maths.md §6); see
    ``_run`` for the options. On CPU the passes' work tensors come from the workspace (dbprop/memory.py).
    Parametrized weights are the pinned ones of the call (dbprop/core.py); where none are pinned they are read
    here, once, as ``model(x)`` reads them (the gradients are then those of the weights, ``ir.params``)."""
    pins = {} if parametrized.is_pinned(program.ir.param_sources) else program.read_parametrized(keep_state=True)
    with parametrized.pinned(pins), (memory.workspace() if x.device.type == "cpu" else contextlib.nullcontext()):
        return _run(program, head, x, **options)


@torch.no_grad()
def _run(program: Program, head: Penalty, x: Tensor, *, sample_weight: Union[float, Tensor] = 1.0,
        need_param_grads: bool = False, need_input_grad: bool = False, chunk_size: Optional[int] = None,
        fp: Optional[ForwardState] = None, keep_fp: bool = False, backend: str = "python",
        update_stats: bool = False) -> Result:
    """``sample_weight`` ``w`` scales ``q_0`` (and the loss cotangent) per sample; parameter gradients are
    summed over the batch, the input gradient stays per sample. ``fp`` reuses an earlier forward pass;
    ``keep_fp`` asks for the forward state in the result. ``backend``: "python" or "native".
    ``update_stats``: the forward pass updates BatchNorm running statistics as ``model(x)`` would.
    """
    need_any = need_param_grads or need_input_grad
    grads = ParamGrads(program.ir) if need_param_grads else None
    B = x.shape[0]
    w = torch.as_tensor(sample_weight, dtype=x.dtype, device=x.device).expand(B).reshape(1, B)
    tuner, key = program.chunk_tuner, None
    if (backend == "native" and program.native_chain and fp is None and not keep_fp
            and isinstance(head, JacobianFrobenius) and head.estimator == "exact"):  # Algorithm 4 in one call
        softmax, n = head.output == "softmax", native.chain_num_classes(program)
        chain_fp = native.ChainPasses(program).forward(x, keep_inputs=softmax and need_param_grads)
        if chunk_size is None:
            key = _tuning_key(head, x, None, need_param_grads, need_input_grad, backend)
            schedule, cap = tuner.schedule(key, n), chunk_cap(program, chain_fp, n, B)
        else:
            schedule, cap = [chunk_size], n  # a pinned chunk_size is not capped
        value, input_grad, sizes, seconds = native.jacobian_penalty(
            program, chain_fp, x, softmax, schedule, cap, key is not None and tuner.tuning(key), None, 1.0,
            w[0].contiguous(), grads, need_input_grad)
        if seconds:
            tuner.record(key, sizes, seconds)
        return Result(value, grads.as_list() if grads else None, input_grad, None)
    P = make_passes(program, backend)
    fbp = need_any and (head.has_eta or program.has_sources)  # η ≢ 0: one forward-backward pass
    if fp is None:
        fp = P.forward(x, keep_inputs=fbp and bool(grads), update_stats=update_stats)
    o = fp.output
    if not head.ready:
        head.setup(o, x, PassJacobian(P, fp, head))
    value = head.loss_value(o) if head.has_loss else o.new_zeros(B)
    input_grad: Optional[Tensor] = None
    eta_L: Optional[Tensor] = None
    sources: Optional[dict] = {} if fbp else None   # ŝ, summed over class chunks (§6)
    keep_nodes = P.nodes_with_second_order_terms(grads, fbp) if need_any else set()
    n = head.num_directions
    if chunk_size is None:
        key = _tuning_key(head, x, n, need_param_grads, need_input_grad, backend)
        schedule, cap = tuner.schedule(key, n), chunk_cap(program, fp, n, B)
    else:
        schedule, cap = [chunk_size], n
    timer = ChunkTimer(x.device, key is not None and tuner.tuning(key))
    for start, kk in _chunks(schedule, n, cap):
        with timer(kk):
            v = head.directions(start, start + kk)
            zeta_L = head.output_cotangent(v)                                      # ζ_L, (k, B, C)
            xi, kept = P.backward(fp, zeta_L.flatten(0, 1), keep=bool(keep_nodes), keep_nodes=keep_nodes)
            xi = xi.unflatten(0, (kk, B))                                          # ξ_0, (k, B, ...)
            if backend == "native" and head.native_head is not None:             # p, q_0, ∂p/∂x in one kernel
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
            if head.has_loss:  # ∇θ ℓ = B_nᵀ ζ: w ζ_L joins η̂_L, one recursion carries both
                eta_L = _accumulate(eta_L, (_bcast(w, zeta_L) * zeta_L).sum(0))
            if q0 is None:
                q0 = head.q0(xi, x) * _bcast(w, xi)                                # q_0 = w ∇p(ξ_0)
                if need_input_grad:
                    direct = head.input_grad(xi, x)
                    if direct is not None:
                        input_grad = _accumulate(input_grad, (direct * _bcast(w, xi)).sum(0))
            if grads or fbp:
                h = P.backward_backward(fp, q0.flatten(0, 1), kept, grads, sources, need_h=head.has_eta)
                if head.has_eta:                                                   # η̂_L += Σ_i η_L^{(i)}
                    eta_L = _accumulate(eta_L, head.output_eta(v, h.unflatten(0, (kk, B))))
            del kept
    if timer.on:
        tuner.record(key, timer.sizes, timer.seconds)
    if fbp:                                                                    # FBP once, from η̂_L and ŝ
        gamma0 = P.forward_backward(fp, eta_L, sources, grads, need_input_grad)
        if need_input_grad:
            input_grad = _accumulate(input_grad, gamma0)
    if need_input_grad and input_grad is None:  # logits, constant v, no sources, p without x: ∇x R = 0 a.e.
        input_grad = torch.zeros_like(x)
    return Result(value, grads.as_list() if grads else None, input_grad, fp)
