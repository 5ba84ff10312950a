"""One evaluation core for every path: the eager autograd Function (dbprop/autograd.py), the ``torch.compile``
operator (dbprop/ops.py) and the autograd fallback (dbprop/fallback.py).

A call is checked once (``check_call``), runs with the autocast policy (``autocast_off``), and chooses the
program or the autograd fallback once (``prepare``); ``value_and_grads`` then gives the reduced value and the
gradients of ``Σ_b w_b R_b`` on either path (docs/maths.md §6; the fallback §7), and ``weighted_grads`` is the
``reduction="none"`` rule for incoming per-sample weights.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import backends, engine, fallback, parametrized
from .errors import UnsupportedModelError
from .penalties import Penalty, check_chunk_size, check_input, check_model, check_reduction
from .program import Program, _unwrap, cached_program, refuse_sharded

_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class FallbackWarning(UserWarning):
    """A model could not be compiled; the penalty runs through autograd double backprop."""


def check_call(model: nn.Module, x: Tensor, reduction: str, chunk_size: Optional[int], backend: str) -> str:
    """The checks every call passes before anything runs, the same on every path; the backend that will run."""
    check_reduction(reduction)
    check_chunk_size(chunk_size)
    check_model(model)
    backend = backends.resolve(backend)
    check_input(x)
    refuse_sharded(model)  # always an error: the autograd fallback cannot run on FSDP shards either
    return backend


def autocast_off(model: nn.Module, x: Tensor):
    """Inside ``torch.autocast``: a context that switches it off, and ``x`` cast (differentiably) to the dtype of
    the model's parameters; else a null context and ``x`` (README, "Mixed precision")."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext(), x
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    return torch.autocast(x.device.type, enabled=False), x.to(dtype)


@dataclass
class Evaluation:
    """One call's checked parts. ``program`` is ``None`` for the autograd fallback; ``params`` are the tensors
    the gradients belong to (the program's parameters, or the model's for the fallback); ``pinned`` the call's
    values of parametrized tensors (dbprop/parametrized.py), read once in ``prepare``."""
    model: nn.Module
    program: Optional[Program]
    head: Penalty
    reduction: str
    chunk_size: Optional[int]
    backend: str
    params: List[Tensor]
    pinned: Dict[Tuple[int, str], Tensor] = field(default_factory=dict)


@dataclass
class Grads:
    value: Optional[Tensor]               # reduce(R_b)
    input_grad: Optional[Tensor]          # None where not wanted
    param_grads: List[Optional[Tensor]]   # aligned with the ``params`` asked for; None where not wanted or unused
    state: Any = None                     # what a recompute reuses (``keep``): the forward state, or the graph


def prepare(model: nn.Module, head: Penalty, x: Tensor, reduction: str, chunk_size: Optional[int], backend: str,
            strict: bool, stacklevel: int, recompute: bool = False) -> Evaluation:
    """The program-or-fallback choice for an input that passed ``check_call``: the model's verified program, or
    the autograd fallback after one ``FallbackWarning`` per model (``stacklevel`` as for ``warnings.warn`` in the
    caller); ``strict=True`` raises instead. The call's one read of each parametrized tensor happens here: its
    state (spectral_norm's power iteration) moves, like BatchNorm's running statistics, for penalties that
    replace the task forward (``head.has_loss``); ``recompute``: the read of a later recompute, which gives the
    first read's value and moves nothing."""
    pinned: Dict[Tuple[int, str], Tensor] = {}
    before: Optional[Dict[str, Tensor]] = None
    try:
        program = cached_program(model)
        program.check_shapes(x)
        if not program.verified and program.ir.parametrized:
            before = {name: b.clone() for name, b in program.model.named_buffers()}
        pinned = program.read_parametrized(head.has_loss, recompute)
        with parametrized.pinned(pinned):
            program.verify(x, before)
    except UnsupportedModelError as e:
        if before is not None:  # the fallback's own forward moves the state: undo the read's move
            with torch.no_grad():
                for name, b in _unwrap(model).named_buffers():
                    if not torch.equal(b, before[name]):
                        b.copy_(before[name])
        pinned = {}
        if strict:
            raise
        if model not in _warned:
            _warned.add(model)
            warnings.warn(f"dbprop: {e}; falling back to autograd double backpropagation", FallbackWarning,
                          stacklevel=stacklevel + 1)
        program = None
    model = _unwrap(model)  # the fallback, like the program, runs the module itself (gradients flow to its leaves)
    params = program.parameters() if program is not None else list(model.parameters())
    return Evaluation(model, program, head, reduction, chunk_size, backend, params, pinned)


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def value_and_grads(ev: Evaluation, x: Tensor, params: Sequence[Tensor], need_input: bool = False,
                    need_params: Sequence[bool] = (), weight: Optional[Tensor] = None, keep: bool = False,
                    state: Any = None) -> Grads:
    """The reduced value and the gradients of ``Σ_b w_b R_b`` w.r.t. ``x`` (if ``need_input``) and each of
    ``params`` (where ``need_params``), with ``w = weight`` or, when ``weight`` is None, the weights of the
    reduction (``1/B`` for "mean", else 1). Straight through the passes, or autograd for the fallback.

    ``keep``: return the state a recompute reuses; ``state``: such a state (no new forward pass). BatchNorm
    running statistics move as by one ``model(x)`` call for penalties that replace the task forward
    (``head.has_loss``), on the first evaluation only (``weight`` None, no ``state``)."""
    w: Union[float, Tensor] = (1.0 / x.shape[0] if ev.reduction == "mean" else 1.0) if weight is None else weight
    update_stats = ev.head.has_loss and weight is None and state is None
    want = any(need_params)
    keep = keep and (want or need_input)
    if ev.program is None:
        return _fallback(ev, x, params, need_input, need_params, w, keep, state, update_stats)
    with parametrized.pinned(ev.pinned):
        r = engine.run(ev.program, ev.head, x.detach(), sample_weight=w, need_param_grads=want,
                       need_input_grad=need_input, chunk_size=ev.chunk_size, fp=state, keep_fp=keep,
                       backend=ev.backend, update_stats=update_stats)
    by_id = ev.program.gradients(r.param_grads, ev.pinned) if r.param_grads else {}
    gps = [by_id.get(id(p)) if n else None for p, n in zip(params, need_params)]
    return Grads(reduce(r.value, ev.reduction), r.input_grad if need_input else None, gps, r.fp if keep else None)


def _fallback(ev, x, params, need_input, need_params, w, keep, state, update_stats) -> Grads:
    """``value_and_grads`` by autograd double backprop; its state is the graph of the per-sample values."""
    want = [p for p, n in zip(params, need_params) if n]
    with torch.enable_grad():
        if state is None:
            xr = x.detach().requires_grad_(need_input)
            values = fallback.autograd_penalty(ev.model, ev.head, xr, update_stats=update_stats)
        else:
            xr, values = state
        grads = list(torch.autograd.grad((values * w).sum(), ([xr] if need_input else []) + want, allow_unused=True,
                                         retain_graph=keep or state is not None)) if (want or need_input) else []
    gx = grads.pop(0) if need_input else None
    if need_input and gx is None:
        gx = torch.zeros_like(x)
    by_id = dict(zip(map(id, want), grads))
    gps = [by_id.get(id(p)) if n else None for p, n in zip(params, need_params)]
    return Grads(reduce(values.detach(), ev.reduction), gx, gps, (xr, values) if keep else None)


def _scale(t: Optional[Tensor], s: Tensor) -> Optional[Tensor]:
    return None if t is None else t * s


def weighted_grads(ev: Evaluation, x: Tensor, params: Sequence[Tensor], need_input: bool,
                   need_params: Sequence[bool], g: Tensor, saved: Optional[Grads] = None
                   ) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
    """``∇x`` and ``∇θ`` of ``Σ_b g_b R_b`` for the incoming gradient ``g`` of the reduced value: the gradients
    ``saved`` by ``value_and_grads`` scaled by ``g`` (a scalar unless ``reduction="none"``, uniform weights
    alike); else, with unequal per-sample weights or nothing saved, recomputed with the weights ``g`` from
    ``saved.state`` (or a fresh forward pass): exact also where train-mode BatchNorm couples the samples."""
    if saved is not None and (ev.reduction != "none" or bool((g == g[0]).all())):
        s = g if ev.reduction != "none" else g[0]
        return _scale(saved.input_grad, s), [_scale(p, s) for p in saved.param_grads]
    r = value_and_grads(ev, x, params, need_input, need_params, weight=g, state=saved.state if saved else None)
    return r.input_grad, r.param_grads
