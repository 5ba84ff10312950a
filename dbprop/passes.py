"""The four passes over a DAG program (docs/maths.md §2, §3): the driver both backends share.

Notation: node ``n`` has inputs ``args[n]``; ``ξ_out(n)`` is the backward cotangent at its output (``ζ`` for
affine nodes), ``q`` the tangents of the backward-backward pass, ``η`` the forward-backward cotangents and
``ŝ`` the second-order sources. Several directions ride along the batch dimension (``k·B`` rows).
Element work goes through ``kernels`` (:class:`dbprop.nodes.PythonKernels`, the readable reference, or
:class:`dbprop.native.NativeKernels`). The passes read the immutable IR (:mod:`dbprop.ir`) and keep all their
values in the call, so any number of passes may run on one program at once (threads, or a pass nested in an
opaque node's forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .ir import INPUT, IR, as_output_matrix
from .nodes import RunContext, UnsupportedOp


@dataclass
class ForwardState:
    """What the forward pass keeps: per node its saved state; the output as ``(B, C)``."""

    saved: List[object]
    output: Tensor
    out_shape: torch.Size          # the output node's own shape (the output is its ``(B, C)`` view)
    numel_per_sample: int          # Σ over nodes of one sample's output size (sizes the class chunks)
    batch: int


class ParamGrads:
    """Accumulators ``θ̂`` and gradients, one per program parameter (shared parameters summed)."""

    def __init__(self, program: IR) -> None:
        self.program = program
        self.params = program.parameters()
        self.acc: List[Optional[Tensor]] = [None] * len(self.params)
        self.wanted = [p.requires_grad for p in self.params]

    def __bool__(self) -> bool:
        return any(self.wanted)

    def want(self, n: int) -> List[bool]:
        """Per parameter of node ``n``: is its gradient wanted?"""
        return [self.wanted[i] for i in self.program.param_index[n]]

    def add_node(self, n: int, grads) -> None:
        for i, g in zip(self.program.param_index[n], grads):
            if g is not None and self.wanted[i]:
                self.acc[i] = g if self.acc[i] is None else self.acc[i] + g

    def as_list(self) -> List[Optional[Tensor]]:
        """Aligned with ``program.parameters()``: ``None`` where not wanted, zeros where wanted but never
        reached (e.g. bias gradients when ``η ≡ 0``: they are exactly zero)."""
        return [None if not w else torch.zeros_like(p) if g is None else g
                for p, w, g in zip(self.params, self.wanted, self.acc)]


def _add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    if term is None:
        return total
    return term if total is None else total + term


class Passes:
    """FP, BP, BBP and FBP of ``program`` (an :class:`~dbprop.ir.IR`) with the element kernels ``kernels``."""

    def __init__(self, program: IR, kernels) -> None:
        self.program, self.K = program, kernels

    # ---- FP
    def forward(self, x: Tensor, keep_inputs: bool, update_stats: bool = False) -> ForwardState:
        """Topological order; keeps what each node's operators need (and inputs of affine nodes if asked).
        Interprets the IR's steps with the traced values in ``env``, a local of this call."""
        p = self.program
        env: Dict[Any, Any] = {p.placeholder: x}
        ctx = RunContext(self.K, keep_inputs, update_stats, x.shape[0], env)
        saved: List[object] = [None] * len(p.ops)
        numel = 0
        for step, frees in zip(p.steps, p.last_use):
            n = step.op
            if n is None:
                env[step.node] = step.call((), env)
            else:
                xs = [x if m == INPUT else env[p.op_nodes[m]] for m in p.args[n]]
                ctx.per_sample = p.args_per_sample[n]
                try:
                    y, saved[n] = p.ops[n].run(xs, ctx)
                except UnsupportedOp:
                    raise
                except RuntimeError as e:
                    raise ValueError(f"node {n} ({p.ops[n].name}, {p.ops[n].kind}) failed on inputs of shape "
                                     f"{[tuple(t.shape) for t in xs]} (model input {tuple(x.shape)}): {e}") from e
                if not isinstance(y, Tensor):
                    raise UnsupportedOp(f"node {n} ({p.ops[n].name}) returns {type(y).__name__}, not a tensor")
                if p.depends_on_input[n]:  # parameter leaves and their functions may have any shape (§4.14)
                    if y.dim() == 0 or y.shape[0] != x.shape[0]:
                        raise UnsupportedOp(f"node {n} ({p.ops[n].name}) does not keep the batch dimension first")
                    numel += y[0].numel()
                env[step.node] = y
            for a in frees:
                env.pop(a, None)
        out = env[p.output_node]
        return ForwardState(saved, as_output_matrix(out), out.shape, numel, x.shape[0])

    # ---- BP
    def backward(self, fp: ForwardState, zeta_L: Tensor, keep: bool, keep_nodes=None):
        """``ξ`` at each node's output is the sum over its consumers of ``Aᵀ ξ``; returns ``ξ_0`` and, if
        ``keep``, ``ξ_out(n)`` of the nodes that have mixed terms or sources (``keep_nodes``)."""
        p = self.program
        rows = zeta_L.shape[0]
        cot: Dict[int, Tensor] = {p.output: zeta_L.reshape(rows, *fp.out_shape[1:])}
        kept: Dict[int, Tensor] = {}
        xi0: Optional[Tensor] = None
        for n in reversed(range(len(p.ops))):
            c = cot.pop(n, None)
            if c is None:
                continue
            if keep and (keep_nodes is None or n in keep_nodes):
                kept[n] = c
            if not any(m == INPUT or p.depends_on_input[m] for m in p.args[n]):
                continue
            for m, g in zip(p.args[n], p.ops[n].backward_step(c, fp.saved[n], self.K)):
                if g is None:
                    continue
                if m == INPUT:
                    xi0 = _add(xi0, g)
                elif p.depends_on_input[m]:
                    cot[m] = _add(cot.get(m), g)
        if xi0 is None:
            raise RuntimeError("the model output does not depend on its input")
        return xi0, kept

    # ---- BBP
    def backward_backward(self, fp: ForwardState, q0: Tensor, kept: Dict[int, Tensor],
                          theta_hat: Optional[ParamGrads], sources: Optional[Dict[int, Tensor]],
                          need_h: bool) -> Optional[Tensor]:
        """Topological order: ``q_out(n) = A_n q_in(n)``; ``θ̂_n += ∂_θ⟨ξ_out, A_n(θ) q_in⟩`` and
        ``ŝ_m += ∂_{y_m}⟨ξ_out, A_n(y) q_in⟩`` (summed into ``sources``). Returns ``h_L`` if ``need_h``; with
        ``theta_hat=None`` and ``sources=None`` this is the plain tangent (JVP) pass."""
        p = self.program
        need_q = self.tangents_needed(theta_hat, sources is not None, need_h)
        tan: Dict[int, Tensor] = {INPUT: q0}
        remaining = {INPUT: len(p.input_consumers), **{n: len(c) for n, c in enumerate(p.consumers)}}
        h = None
        for n, op in enumerate(p.ops):
            qs = [tan.get(m) for m in p.args[n]]
            xi = kept.pop(n, None)
            if any(q is not None for q in qs):
                want = theta_hat.want(n) if theta_hat is not None else [False] * len(p.param_index[n])
                if sources is None and not any(want):
                    xi = None
                q, mixed, src = op.bbp_step(xi, qs, fp.saved[n], want, need_q[n], self.K)
                if theta_hat is not None:
                    theta_hat.add_node(n, mixed)
                if sources is not None:
                    for m, s in zip(p.args[n], src):
                        if s is not None:
                            sources[m] = _add(sources.get(m), s)
                if q is not None:
                    tan[n] = q
                    if n == p.output:
                        h = q
            for m in p.args[n]:  # free tangents nobody needs any more
                remaining[m] -= 1
                if remaining[m] == 0:
                    tan.pop(m, None)
        return h.reshape(h.shape[0], -1) if need_h and h is not None else None

    def tangents_needed(self, theta_hat: Optional[ParamGrads], with_sources: bool, need_h: bool) -> List[bool]:
        """``q_out(n)`` is needed if a consumer has a wanted mixed term or a source, or needs its own tangent."""
        p = self.program
        need = [False] * len(p.ops)
        for n in reversed(range(len(p.ops))):
            if n == p.output and need_h:
                need[n] = True
                continue
            for c in p.consumers[n]:
                wants = theta_hat is not None and any(theta_hat.want(c))
                if need[c] or wants or (with_sources and p.ops[c].has_source):
                    need[n] = True
                    break
        return need

    def nodes_with_second_order_terms(self, theta_hat: Optional[ParamGrads], with_sources: bool) -> set:
        """Nodes whose ``ξ_out`` the backward-backward pass reads (wanted mixed terms or sources)."""
        p = self.program
        return {n for n, op in enumerate(p.ops)
                if (theta_hat is not None and any(theta_hat.want(n))) or (with_sources and op.has_source)}

    # ---- FBP
    def forward_backward(self, fp: ForwardState, eta_L: Optional[Tensor], sources: Dict[int, Tensor],
                         grads: Optional[ParamGrads], need_input_grad: bool) -> Optional[Tensor]:
        """Reverse order, once: ``η_out(n) = Σ_c A_cᵀ η_out(c) + ŝ_n`` (``+ η_L`` at the output);
        ``∇θ_n += B_nᵀ η_out(n)``. Returns ``∇x R = η_out(x) + ŝ_x`` when ``need_input_grad``."""
        p = self.program
        upstream = self.upstream_needs(grads, need_input_grad)
        eta: Dict[int, Tensor] = {}
        if eta_L is not None:
            eta[p.output] = eta_L.reshape(eta_L.shape[0], *fp.out_shape[1:])
        for n in reversed(range(len(p.ops))):
            e = _add(eta.pop(n, None), sources.pop(n, None))
            if e is None:
                continue
            want = grads.want(n) if grads is not None else [False] * len(p.param_index[n])
            want_inputs = any(upstream[m] for m in p.args[n])
            if not want_inputs and not any(want):
                continue
            ins, pg = p.ops[n].fbp_step(e, fp.saved[n], want_inputs, want, self.K)
            if grads is not None:
                grads.add_node(n, pg)
            if ins is not None:
                for m, g in zip(p.args[n], ins):
                    if g is not None and upstream[m]:
                        eta[m] = _add(eta.get(m), g)
        return _add(eta.pop(INPUT, None), sources.pop(INPUT, None)) if need_input_grad else None

    def upstream_needs(self, grads: Optional[ParamGrads], need_input_grad: bool) -> Dict[int, bool]:
        """Does ``η`` at node ``m``'s output feed a wanted gradient (its own or one upstream)?"""
        p = self.program
        up: Dict[int, bool] = {INPUT: need_input_grad}
        for n in range(len(p.ops)):
            own = grads is not None and any(grads.want(n))
            up[n] = own or any(up[m] for m in p.args[n])
        return up
