"""Saliency and robustness measurements (Etmann, Lunz, Maass, Schönlieb, ICML 2019), per sample and batched.

All C input gradients come from ONE batched backward pass of the program (directions e_1..e_C stacked
along the batch); unsupported models go through autograd. Notation: Ψ the logits, i* = F(x) the predicted
class, g^i = ∇x Ψ^i(x).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backends
from ..engine import make_passes
from ..errors import UnsupportedModelError
from ..ir import as_output_matrix
from ..penalties import check_input, check_model
from ..program import cached_program


def _flat(t: Tensor) -> Tensor:
    return t.reshape(*t.shape[:2], -1)


@torch.no_grad()
def logits_and_input_gradients(model: nn.Module, x: Tensor, classes: Optional[Tensor] = None,
                               backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(Ψ(x), G)`` with ``G[k, b] = ∇x Ψ^{c_kb}(x_b)``: all classes (``classes=None``, ``G`` is ``(C, B, ...)``)
    or the per-sample classes ``classes`` of shape ``(K, B)``, in one batched backward pass."""
    check_model(model)
    backend = backends.resolve(backend)
    check_input(x)  # also on the autograd path
    try:
        program = cached_program(model)
        program.check_shapes(x)
        program.verify(x)
    except UnsupportedModelError:
        return _autograd_input_gradients(model, x, classes)
    P = make_passes(program, backend)
    fp = P.forward(x, keep_inputs=False)
    logits = fp.output
    B, C = logits.shape
    if classes is None:
        classes = torch.arange(C, device=x.device)[:, None].expand(C, B)
    v = torch.nn.functional.one_hot(classes, C).to(logits.dtype)                 # (K, B, C)
    xi, _ = P.backward(fp, v.flatten(0, 1), keep=False)
    return logits, xi.unflatten(0, v.shape[:2])


def _autograd_input_gradients(model, x, classes):
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        logits = as_output_matrix(model(x_))
        B, C = logits.shape
        if classes is None:
            classes = torch.arange(C, device=x.device)[:, None].expand(C, B)
        grads = [torch.autograd.grad(logits.gather(1, c[:, None]).sum(), x_, retain_graph=True)[0] for c in classes]
    return logits.detach(), torch.stack(grads)


def saliency(model: nn.Module, x: Tensor, target: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``∇x Ψ^t(x)`` per sample; ``t`` is the predicted class unless ``target`` (int or ``(B,)``) is given."""
    if target is None:
        logits, G = logits_and_input_gradients(model, x, backend=backend)
        t = logits.argmax(1)
        return G[t, torch.arange(x.shape[0], device=x.device)]
    t = torch.as_tensor(target, device=x.device)
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    if t.shape != (x.shape[0],) or t.is_floating_point():
        raise ValueError(f"target must be an int or an integer tensor of shape ({x.shape[0]},)")
    return logits_and_input_gradients(model, x, t[None], backend=backend)[1][0]


def alignment(model: nn.Module, x: Tensor, backend: str = "auto") -> Tensor:
    """``α(x) = |⟨x, g⟩| / ‖g‖`` with ``g = ∇x Ψ^{F(x)}`` (0 where ``g = 0``)."""
    return _projection_length(x, saliency(model, x, backend=backend))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _projection_length(x: Tensor, g: Tensor) -> Tensor:
    """``|⟨x, g⟩| / ‖g‖`` per sample (0 where ``g = 0``)."""
    x, g = x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1)
    return _ratio((x * g).sum(-1).abs(), g.norm(dim=-1))


def _runner_up(model, x, backend):
    """``G``, ``i*`` and the linearised distances ``(Ψ^{i*} − Ψ^j) / ‖g^{i*} − g^j‖`` to every decision boundary
    (``inf`` for ``j = i*``), ``(C, B)``."""
    logits, G = logits_and_input_gradients(model, x, backend=backend)
    B, C = logits.shape
    if C < 2:
        raise ValueError("robustness measures need at least two classes")
    b = torch.arange(B, device=x.device)
    i_star = logits.argmax(1)
    gap = logits[b, i_star][None] - logits.T                                   # (C, B): Ψ^{i*} − Ψ^j
    dg = _flat(G[i_star, b][None] - G)                                          # (C, B, N)
    dist = _ratio(gap, dg.norm(dim=-1))
    dist[i_star, b] = float("inf")
    return G, i_star, dist


def linearized_robustness(model: nn.Module, x: Tensor, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``ρ̃(x) = min_{j≠i*} (Ψ^{i*} − Ψ^j) / ‖∇Ψ^{i*} − ∇Ψ^j‖`` and the minimising class ``j*``."""
    _, _, dist = _runner_up(model, x, backend)
    rho, j_star = dist.min(0)
    return rho, j_star


def binarized_alignment(model: nn.Module, x: Tensor, backend: str = "auto") -> Tensor:
    """``α†(x) = |⟨x, g†⟩| / ‖g†‖`` with ``g† = ∇(Ψ^{i*} − Ψ^{j*})``."""
    G, i_star, dist = _runner_up(model, x, backend)
    b = torch.arange(x.shape[0], device=x.device)
    return _projection_length(x, G[i_star, b] - G[dist.argmin(0), b])


def homogeneous_decomposition(model: nn.Module, x: Tensor, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(⟨x, ∇xΨ^i⟩, β^i = Ψ^i − ⟨x, ∇xΨ^i⟩)`` for all classes, each ``(B, C)``. For ReLU nets
    (Theorem 1) ``β^i = Σ_j ⟨b_j, ∇_{b_j} Ψ^i⟩``; it vanishes for bias-free nets."""
    logits, G = logits_and_input_gradients(model, x, backend=backend)
    x_terms = (_flat(x[None]) * _flat(G)).sum(-1).T
    return x_terms, logits - x_terms
