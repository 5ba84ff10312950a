"""Weight parametrizations (``torch.nn.utils.parametrize``: ``spectral_norm``, ``weight_norm``, ``orthogonal``
and user parametrizations) on the weight and bias of affine nodes (docs/maths.md §4.16).

A parametrized tensor ``W = φ(θ_φ)`` is read ONCE per call (``read``), with autograd recording ``φ``: that read
is the call's one forward of the parametrization, so spectral normalisation's power iteration moves exactly as
one ``model(x)`` in the same mode would move it. Every pass of the call, the recompute of a ``reduction="none"``
backward included, reads that same tensor (``pinned``); the passes give ``∇_W R``, and ``chain`` turns it into
``∇_θφ R = (∂φ/∂θ_φ)ᵀ ∇_W R`` with autograd on the parameter-sized graph of φ.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: (module, tensor name) of a parametrized tensor
Source = Tuple[nn.Module, str]

#: the call's values of parametrized tensors, by (id(module), name)
_pinned: contextvars.ContextVar[Dict[Tuple[int, str], Tensor]] = contextvars.ContextVar("dbprop_pinned", default={})


def is_parametrized(module: nn.Module, name: Optional[str] = None) -> bool:
    return parametrize.is_parametrized(module, name)


def targets(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(module path, module, tensor name)`` of every parametrized tensor of ``model``."""
    return [(path, m, name) for path, m in model.named_modules() if is_parametrized(m)
            for name in m.parametrizations.keys()]


def unparametrized_type(module: nn.Module) -> type:
    """The module's own class: ``register_parametrization`` swaps in a generated subclass (``ParametrizedConv2d``)."""
    t = type(module)
    return t.__bases__[0] if is_parametrized(module) else t


def tensor(module: nn.Module, name: str) -> Optional[Tensor]:
    """``module.<name>``: the call's pinned value of a parametrized tensor, else the attribute itself."""
    value = _pinned.get().get((id(module), name))
    return getattr(module, name) if value is None else value


def leaves(source: Source) -> List[Tensor]:
    """The tensors a parametrized tensor's gradient belongs to: its parametrization's parameters (``original``,
    or ``original0``/``original1`` of ``weight_norm``, and any parameter of the parametrization modules)."""
    module, name = source
    return list(module.parametrizations[name].parameters())


def read(sources: Sequence[Source], keep_state: bool, recompute: bool = False) -> Dict[Tuple[int, str], Tensor]:
    """Each parametrized tensor computed once, with autograd recording φ, as one ``model(x)`` computes it (in
    the parametrization modules' own mode: spectral_norm in train mode takes a power-iteration step).
    ``keep_state=False`` restores the parametrizations' buffers afterwards (the value as read, the state as
    before: penalties that do not replace the task forward, like BatchNorm's running statistics).
    ``recompute``: the same value again later in the call (a ``reduction="none"`` recompute): after a kept
    state (``keep_state=True``) by an eval-mode read of that state, else by the same read, restored again."""
    values: Dict[Tuple[int, str], Tensor] = {}
    with torch.enable_grad():
        for module, name in sources:
            plist = module.parametrizations[name]
            modes = [(m, m.training) for m in plist.modules()]
            state = [(b, b.clone()) for b in plist.buffers()] if not keep_state else []
            try:
                if recompute and keep_state:
                    plist.eval()
                values[(id(module), name)] = getattr(module, name)
            finally:
                for m, mode in modes:
                    m.training = mode
                with torch.no_grad():
                    for b, before in state:  # only what moved: the graph of φ may have saved the others
                        if not torch.equal(b, before):
                            b.copy_(before)
    return values


def is_pinned(sources: Sequence[Optional[Source]]) -> bool:
    """Whether every parametrized tensor among ``sources`` has a pinned value."""
    values = _pinned.get()
    return all((id(src[0]), src[1]) in values for src in sources if src is not None)


@contextlib.contextmanager
def pinned(values: Dict[Tuple[int, str], Tensor]) -> Iterator[None]:
    """Inside: nodes read ``values`` for their parametrized tensors (``tensor``)."""
    if not values:
        yield
        return
    token = _pinned.set({**_pinned.get(), **values})
    try:
        yield
    finally:
        _pinned.reset(token)


def chain(sources: Sequence[Optional[Source]], grads: Sequence[Optional[Tensor]],
          values: Dict[Tuple[int, str], Tensor]) -> Dict[int, Tensor]:
    """``∇_θφ R = (∂φ/∂θ_φ)ᵀ ∇_W R`` (4.21) for the parametrized entries of ``grads`` (``sources[i]`` not None),
    by ``id`` of each leaf; summed over tensors sharing a leaf. The graph of φ is kept (a recompute chains again)."""
    outs, cots, wanted = [], [], {}
    for src, g in zip(sources, grads):
        if src is None or g is None:
            continue
        w = values[(id(src[0]), src[1])]
        if w.requires_grad:
            outs.append(w)
            cots.append(g)
            wanted.update((id(t), t) for t in leaves(src) if t.requires_grad)
    if not outs:
        return {}
    inputs = list(wanted.values())
    with torch.enable_grad():
        gs = torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True)
    return {id(t): torch.zeros_like(t) if g is None else g for t, g in zip(inputs, gs)}
