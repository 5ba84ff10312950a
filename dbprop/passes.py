"""The four passes of DESIGN.md §2 over a stage program (the readable pure-PyTorch reference).

Notation: ops are walked in program order; for an affine op ``j`` its input is ``x_{j-1}`` and the
cotangent at its output is ``ζ_j`` (backward), ``η_j`` (forward-backward). Tangents ``q`` run forward
(backward-backward). Several directions ride along the batch dimension (``k·B`` rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .operators import Affine
from .program import Program


@dataclass
class ForwardState:
    """What the forward pass keeps: per op its saved state (inputs of ``K_j`` when asked, masks, indices)."""

    saved: List[object]
    output: Tensor
    numel_per_sample: int  # Σ over ops of the output size of one sample (sizes the class chunks)


class ParamGrads:
    """Accumulators ``θ̂_j`` (weight) and bias gradients, one per affine op whose parameters need them."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.acc: Dict[int, List[Optional[Tensor]]] = {}
        self.wanted: Dict[int, tuple] = {}
        for i in program.affine_indices:
            op = program.ops[i]
            need_w = op.weight.requires_grad
            need_b = op.bias is not None and op.bias.requires_grad
            if need_w or need_b:
                self.wanted[i] = (need_w, need_b)
                self.acc[i] = [None, None]

    def __bool__(self) -> bool:
        return bool(self.wanted)

    def add(self, i: int, dW: Optional[Tensor], db: Optional[Tensor]) -> None:
        for k, g in enumerate((dW, db)):
            if g is not None:
                self.acc[i][k] = g if self.acc[i][k] is None else self.acc[i][k].add_(g)

    def per_affine(self):
        """``(want_weight, want_bias, weight accumulators, bias accumulators)``, one entry per affine op."""
        idx = self.program.affine_indices
        want = [self.wanted.get(i, (False, False)) for i in idx]
        acc = [self.acc.get(i, [None, None]) for i in idx]
        return [w for w, _ in want], [b for _, b in want], [a[0] for a in acc], [a[1] for a in acc]

    def set_per_affine(self, weights: List[Optional[Tensor]], biases: Optional[List[Optional[Tensor]]] = None) -> None:
        for n, i in enumerate(self.program.affine_indices):
            if i in self.acc:
                self.acc[i][0] = weights[n]
                if biases is not None:
                    self.acc[i][1] = biases[n]

    def as_list(self) -> List[Optional[Tensor]]:
        """Gradients aligned with ``program.parameters()``: ``None`` where not wanted, zeros where wanted but
        never reached (bias gradients when ``η ≡ 0``: they are exactly zero)."""
        out: List[Optional[Tensor]] = []
        for i in self.program.affine_indices:
            acc = self.acc.get(i, [None, None])
            for p, g in zip(self.program.ops[i].parameters(), acc):
                out.append(None if not p.requires_grad else torch.zeros_like(p) if g is None else g)
        return out


def forward(program: Program, x: Tensor, keep_inputs: bool) -> ForwardState:
    """FP: ``z_j = K_j x_{j-1} + b_j``, ``x_j = g_j(z_j)``; keep masks ``a_j`` and (if asked) ``x_{j-1}``."""
    saved, numel = [], 0
    for op in program.ops:
        x, s = op.forward(x, keep_inputs)
        saved.append(s)
        numel += x[0].numel()
    return ForwardState(saved, x, numel)


def backward(program: Program, fp: ForwardState, zeta_L: Tensor, keep_zetas: bool):
    """BP (Algorithm 1): ``ξ_{j-1} = Kᵀ_j ζ_j``, ``ζ_{j-1} = a_{j-1} ⊙ ξ_{j-1}``; returns ``ξ_0`` and the ``ζ_j``."""
    zetas: Dict[int, Tensor] = {}
    c = zeta_L
    for i in reversed(range(len(program.ops))):
        if keep_zetas and isinstance(program.ops[i], Affine):
            zetas[i] = c
        c = program.ops[i].transpose(c, fp.saved[i])
    return c, zetas


def backward_backward(program: Program, fp: ForwardState, q0: Tensor, zetas: Dict[int, Tensor],
                      theta_hat: Optional[ParamGrads], need_h: bool) -> Optional[Tensor]:
    """BBP (Algorithm 2): ``θ̂¹_j += K□_j(q_{j-1}, ζ_j)``, ``h_j = K_j q_{j-1}``, ``q_j = a_j ⊙ h_j``.

    ``ζ_j`` is freed as soon as it has been used. ``K_L`` is skipped unless ``need_h`` (``η_L ≠ 0``);
    with ``theta_hat=None`` this is the plain tangent (JVP) pass and returns ``h_L``.
    """
    q = q0
    for i, op in enumerate(program.ops):
        if isinstance(op, Affine):
            zeta = zetas.pop(i, None)
            if theta_hat is not None and i in theta_hat.wanted:
                if theta_hat.wanted[i][0]:  # the bias has no θ̂¹ term: K□ is the weight adjoint only
                    theta_hat.add(i, op.weight_adjoint(q, zeta, False)[0], None)
            del zeta
            if i == program.last_affine and not need_h:
                return None
        q = op.linear(q, fp.saved[i])
    return q


def forward_backward(program: Program, fp: ForwardState, eta_L: Tensor, grads: Optional[ParamGrads],
                     need_input_grad: bool) -> Optional[Tensor]:
    """FBP (Algorithm 3, ReLU: ``g'' = 0``): ``∇θ_j += K□_j(x_{j-1}, η_j)``, ``∇b_j += Σ η_j``,
    ``γ_{j-1} = Kᵀ_j η_j``, ``η_{j-1} = a_{j-1} ⊙ γ_{j-1}``. Returns ``γ_0`` when ``need_input_grad``."""
    eta = eta_L
    for i in reversed(range(len(program.ops))):
        op = program.ops[i]
        if isinstance(op, Affine) and grads is not None and i in grads.wanted:
            need_w, need_b = grads.wanted[i]
            x_in = fp.saved[i][0]
            if need_w:
                dW, db = op.weight_adjoint(x_in, eta, need_b)
            else:
                dW, db = None, op.bias_gradient(eta)
            grads.add(i, dW, db)
        if i <= program.first_affine and not need_input_grad:
            return None
        eta = op.transpose(eta, fp.saved[i])
    return eta
