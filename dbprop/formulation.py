"""Per-shape choice of how a convolution's three products are computed (docs/maths.md §4.1, "Formulations").

A convolution node needs ``K(W, q)`` (BBP tangents), ``Kᵀ(W, ξ)`` (BP cotangents, FBP) and ``K□(x, ξ)``
(mixed terms, weight gradients). Each is one linear map with several exact formulations whose speed depends on
the shape: oneDNN / cuDNN's convolution kernels (``aten``) are a poor choice for small maps with many channels,
where most kernel taps read padding. The formulations here:

* ``aten``       ``aten.convolution`` and the input / weight outputs of ``aten.convolution_backward``;
* ``dense``      small maps: the convolution as the dense matrix ``T(W)`` of shape ``(C_out·P_out, C_in·P_in)``
                 (P: spatial positions), ``K = x T(W)ᵀ``, ``Kᵀ = ξ T(W)``, ``K□ = S(ξᵀ x)``: three GEMMs with no
                 padding taps; ``S`` is the adjoint of ``W ↦ T(W)`` (a sum over the position pairs of each tap);
* ``pointwise``  1×1 kernels without padding: channel GEMMs over the (strided) positions;
* ``flipped``    ``Kᵀ`` of a stride-1 convolution as a forward convolution with the flipped, channel-swapped kernel;
* ``swapped``    ``K□`` as a forward convolution with batch and channels swapped (stride and dilation exchanged);
* ``channels_last``  ``aten`` on channels-last (NHWC) copies of the arguments, the result returned contiguous:
                 oneDNN's NHWC kernels skip its internal reorders, which dominate for large maps with few channels.

A formulation implements the products it lists in ``products``; ``aten`` implements all three.

Like ``torch.backends.cudnn.benchmark`` (and ``chunk_size=None``, dbprop/tuning.py), the first product of a
shape (product, geometry, per-sample input shape, weight shape, rows, dtype, device) in the process times every
applicable candidate on its real arguments and keeps the fastest (``aten`` unless another is clearly faster,
``MARGIN``); every later product of that shape, in any program, uses the same formulation. The result is exact
whichever wins; formulations differ in rounding only, so within a process a shape always rounds the same way,
while two processes may time a near-tie differently. Under ``torch.use_deterministic_algorithms(True)``, or after
``set_tuning(False)``, nothing is timed: ``aten`` runs.
"""
from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

convolution_backward = torch.ops.aten.convolution_backward

PRODUCTS = ("K", "Kt", "Kbox")  # K(W, q), Kᵀ(W, ξ), K□(x, ξ)
#: ``dense`` is a candidate while its matrix has at most this many entries per kernel tap of ``W`` (so ``T(W)``
#: costs at most a few times ``W`` to build and multiply): maps of 1×1 and 2×2 positions for 3×3 kernels
DENSE_PAIRS_PER_TAP = 2
#: timed runs per candidate, the least time counts (after a warm-up run: primitive creation, first touch)
TIMED_RUNS = 2
#: another formulation replaces ``aten`` only when it takes at most this fraction of ``aten``'s time, so that
#: near-ties keep the reference and the choice is stable from run to run
MARGIN = 0.9

_tuning = True


def set_tuning(enabled: bool) -> None:
    """Switch the timing of formulations on (default) or off (then ``aten`` always runs)."""
    global _tuning
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _tuning = enabled


def tuning_enabled() -> bool:
    return _tuning and not torch.are_deterministic_algorithms_enabled()


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's static shape: ``dim`` spatial dims, kernel, stride, dilation, groups, and the zero padding
    of each spatial dim as ``(lo, hi)`` (asymmetric 'same' padding included)."""

    dim: int
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    pads: Tuple[Tuple[int, int], ...]

    @property
    def symmetric(self) -> bool:
        return all(lo == hi for lo, hi in self.pads)

    def out_size(self, n: int, i: int) -> int:
        lo, hi = self.pads[i]
        return (n + lo + hi - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1


class WeightCache:
    """``f(W)`` for the live weight, rebuilt when ``W`` changes: another tensor object (a parametrized weight is
    a new tensor each call, possibly in the storage of the last one), storage or version counter (an optimizer
    step)."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f, self._entry, self._lock = f, None, threading.Lock()

    def __call__(self, w: Tensor) -> Tensor:
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        entry = self._entry
        if entry is not None and entry[0]() is w and entry[1] == key:
            return entry[2]
        with self._lock:
            value = self.f(w.detach())
            self._entry = (weakref.ref(w), key, value)
        return value


# ------------------------------------------------------------------------------------------------ aten
class Aten:
    """oneDNN / cuDNN through ATen. Asymmetric padding is applied explicitly (pad, then an unpadded
    convolution; crop in ``Kᵀ``)."""

    name = "aten"
    products = PRODUCTS

    def __init__(self, g: ConvGeometry) -> None:
        self.g = g
        if g.symmetric:
            self.padding, self.explicit_pad = [lo for lo, _ in g.pads], None
        else:  # F.pad order: last dim first
            self.padding, self.explicit_pad = [0] * g.dim, [p for lo_hi in reversed(g.pads) for p in lo_hi]

    @staticmethod
    def applies(g: ConvGeometry, in_shape: Sequence[int]) -> bool:
        return True

    def _pad(self, x: Tensor) -> Tensor:
        return x if self.explicit_pad is None else F.pad(x, self.explicit_pad)

    def _backward(self, c: Tensor, x: Tensor, w: Tensor, mask: Sequence[bool]):
        g = self.g
        bias_sizes = [w.shape[0]] if mask[2] else None
        return convolution_backward(c, x, w, bias_sizes, list(g.stride), self.padding, list(g.dilation), False,
                                    [0] * g.dim, g.groups, list(mask))

    def K(self, w: Tensor, q: Tensor) -> Tensor:
        g = self.g
        return torch.convolution(self._pad(q), w, None, list(g.stride), self.padding, list(g.dilation), False,
                                 [0] * g.dim, g.groups)

    def Kt(self, w: Tensor, c: Tensor, in_shape: Sequence[int]) -> Tensor:
        shape = [c.shape[0], *in_shape[1:]]
        for i, (lo, hi) in enumerate(self.g.pads if self.explicit_pad is not None else ()):
            shape[2 + i] += lo + hi
        gx = self._backward(c, c.new_empty(1).expand(shape), w, (True, False, False))[0]
        if self.explicit_pad is not None:
            for i, (lo, _) in enumerate(self.g.pads):
                gx = gx.narrow(2 + i, lo, in_shape[2 + i])
        return gx

    def Kbox(self, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        return self._backward(c, self._pad(x), w, (False, True, False))[1]


# ----------------------------------------------------------------------------------------------- dense
class Dense:
    """The convolution as a dense matrix over each sample's positions: ``T(W)[(o, p), (i, r)] = W[o, i, t]`` where
    input position ``r`` meets output position ``p`` at kernel tap ``t`` (else 0). ``T(W)`` is rebuilt when ``W``
    changes (its version counter), so every product reads the live weight."""

    name = "dense"
    products = PRODUCTS

    def __init__(self, g: ConvGeometry, in_shape: Sequence[int], w_shape: Sequence[int]) -> None:
        self.g = g
        self.c_out, self.c_in = w_shape[0], w_shape[1]
        spatial = list(in_shape[2:])
        self.out_spatial = [g.out_size(n, i) for i, n in enumerate(spatial)]
        self.taps = math.prod(g.kernel)
        self.tap = _tap_index(g, spatial, self.out_spatial)           # (P_out, P_in), ``taps`` where none
        self.p_out, self.p_in = self.tap.shape
        self.matrix = WeightCache(self._matrix)  # T(W), per weight version

    @staticmethod
    def applies(g: ConvGeometry, in_shape: Sequence[int]) -> bool:
        p_in = math.prod(in_shape[2:])
        p_out = math.prod(g.out_size(n, i) for i, n in enumerate(in_shape[2:]))
        return g.groups == 1 and p_out * p_in <= DENSE_PAIRS_PER_TAP * math.prod(g.kernel)

    def _matrix(self, w: Tensor) -> Tensor:
        tap = self.tap.to(w.device)
        wf = torch.cat([w.reshape(self.c_out, self.c_in, self.taps), w.new_zeros(self.c_out, self.c_in, 1)], 2)
        # tap index ``taps`` (no tap joins the two positions) reads the appended zero
        return wf[:, :, tap].permute(0, 2, 1, 3).reshape(self.c_out * self.p_out, self.c_in * self.p_in)

    def K(self, w: Tensor, q: Tensor) -> Tensor:
        return q.reshape(q.shape[0], -1).mm(self.matrix(w).t()).view(q.shape[0], self.c_out, *self.out_spatial)

    def Kt(self, w: Tensor, c: Tensor, in_shape: Sequence[int]) -> Tensor:
        return c.reshape(c.shape[0], -1).mm(self.matrix(w)).view(c.shape[0], *in_shape[1:])

    def Kbox(self, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        G = c.reshape(c.shape[0], -1).t().mm(x.reshape(x.shape[0], -1))       # ξᵀ x over (o, p) × (i, r)
        G = G.view(self.c_out, self.p_out, self.c_in, self.p_in).permute(0, 2, 1, 3)
        S = self._adjoint(G.dtype, G.device)                                  # (P_out·P_in, taps)
        return G.reshape(self.c_out * self.c_in, -1).mm(S).view(w.shape)

    def _adjoint(self, dtype, device) -> Tensor:
        return F.one_hot(self.tap.flatten().to(device), self.taps + 1)[:, :self.taps].to(dtype)


def _tap_index(g: ConvGeometry, spatial: List[int], out_spatial: List[int]) -> Tensor:
    """``(P_out, P_in)`` long tensor: the flat kernel tap joining output position ``p`` and input position ``r``,
    ``prod(kernel)`` where they do not meet. Per dim, input ``r = p·s − lo + t·d`` for tap ``t``."""
    per_dim = []
    for i, (n_in, n_out) in enumerate(zip(spatial, out_spatial)):
        p = torch.arange(n_out)[:, None, None]
        t = torch.arange(g.kernel[i])[None, None, :]
        r = torch.arange(n_in)[None, :, None]
        hit = p * g.stride[i] - g.pads[i][0] + t * g.dilation[i] == r                    # (n_out, n_in, k)
        per_dim.append((hit.any(2), (hit * t).sum(2)))                                 # its tap where hit
    valid, tap = per_dim[0]
    if len(per_dim) == 2:  # row-major: flat tap t_h·k_w + t_w, flat positions likewise
        (v_w, t_w), k_w = per_dim[1], g.kernel[1]
        valid = (valid[:, None, :, None] & v_w[None, :, None, :]).flatten(0, 1).flatten(1, 2)
        tap = (tap[:, None, :, None] * k_w + t_w[None, :, None, :]).flatten(0, 1).flatten(1, 2)
    return torch.where(valid, tap, torch.full_like(tap, math.prod(g.kernel)))


# ------------------------------------------------------------------------------------------- pointwise
class Pointwise:
    """1×1 kernels without padding: ``K = W x_s`` over the positions ``x_s`` that the stride reads, ``Kᵀ`` scatters
    ``Wᵀ ξ`` back to them (zeros elsewhere), ``K□ = Σ ξ x_sᵀ``."""

    name = "pointwise"
    products = PRODUCTS

    def __init__(self, g: ConvGeometry, in_shape: Sequence[int], w_shape: Sequence[int]) -> None:
        self.g = g
        self.out_spatial = [g.out_size(n, i) for i, n in enumerate(in_shape[2:])]
        self.strided = any(s != 1 for s in g.stride)

    @staticmethod
    def applies(g: ConvGeometry, in_shape: Sequence[int]) -> bool:
        return g.groups == 1 and all(k == 1 for k in g.kernel) and all(p == (0, 0) for p in g.pads)

    def _read(self, x: Tensor) -> Tensor:
        if not self.strided:
            return x
        index = (slice(None), slice(None)) + tuple(slice(0, n * s, s) for n, s in zip(self.out_spatial, self.g.stride))
        return x[index]

    def K(self, w: Tensor, q: Tensor) -> Tensor:
        qs = self._read(q)
        return w.reshape(w.shape[0], -1).matmul(qs.reshape(*qs.shape[:2], -1)).view(q.shape[0], w.shape[0],
                                                                                     *self.out_spatial)

    def Kt(self, w: Tensor, c: Tensor, in_shape: Sequence[int]) -> Tensor:
        g = w.reshape(w.shape[0], -1).t().matmul(c.reshape(*c.shape[:2], -1)).view(c.shape[0], -1, *self.out_spatial)
        if not self.strided:
            return g
        out = g.new_zeros(c.shape[0], *in_shape[1:])
        out[(slice(None), slice(None)) + tuple(slice(0, n * s, s) for n, s in zip(self.out_spatial, self.g.stride))] = g
        return out

    def Kbox(self, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        xs = self._read(x)
        c2 = c.transpose(0, 1).reshape(c.shape[1], -1)
        x2 = xs.transpose(0, 1).reshape(xs.shape[1], -1)
        return c2.mm(x2.t()).view(w.shape)


# ----------------------------------------------------------------------------- forward-convolution forms
class Flipped:
    """``Kᵀ`` of a stride-1 convolution as a forward convolution: ``Kᵀ(W, ξ) = K(W̃, ξ)`` with ``W̃[i, o, t] =
    W[o, i, k−1−t]`` (flipped taps, channels swapped) and padding ``d(k−1) − lo`` low, ``d(k−1) − hi`` high."""

    name = "flipped"
    products = ("Kt",)

    def __init__(self, g: ConvGeometry, in_shape: Sequence[int], w_shape: Sequence[int]) -> None:
        self.g = g
        pads = [(d * (k - 1) - lo, d * (k - 1) - hi) for (lo, hi), d, k in zip(g.pads, g.dilation, g.kernel)]
        self.aten = Aten(ConvGeometry(g.dim, g.kernel, g.stride, g.dilation, 1, tuple(pads)))
        self.flipped = WeightCache(lambda w: w.flip(list(range(2, w.dim()))).transpose(0, 1).contiguous())

    @staticmethod
    def applies(g: ConvGeometry, in_shape: Sequence[int]) -> bool:
        return g.groups == 1 and all(s == 1 for s in g.stride) and all(
            lo <= d * (k - 1) and hi <= d * (k - 1) for (lo, hi), d, k in zip(g.pads, g.dilation, g.kernel))

    def Kt(self, w: Tensor, c: Tensor, in_shape: Sequence[int]) -> Tensor:
        return self.aten.K(self.flipped(w), c)


class Swapped:
    """``K□`` as a forward convolution with batch and channels swapped: ``K□(x, ξ)[o, i, t] = Σ_n Σ_p ξ[n, o, p]
    x̄[n, i, p·s + t·d]`` (x̄: x zero-padded) is the convolution of ``x̄`` viewed as ``(C_in, N, ...)`` with the kernel
    ``ξ`` viewed as ``(C_out, N, ...)``, stride ``d`` and dilation ``s``, cropped to the kernel size."""

    name = "swapped"
    products = ("Kbox",)

    def __init__(self, g: ConvGeometry, in_shape: Sequence[int], w_shape: Sequence[int]) -> None:
        self.g = g
        self.pad = [p for lo_hi in reversed(g.pads) for p in lo_hi]  # F.pad order

    @staticmethod
    def applies(g: ConvGeometry, in_shape: Sequence[int]) -> bool:
        return g.groups == 1

    def Kbox(self, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        g = self.g
        xt = F.pad(x, self.pad).transpose(0, 1)
        y = torch.convolution(xt, c.transpose(0, 1), None, list(g.dilation), [0] * g.dim, list(g.stride), False,
                              [0] * g.dim, 1)
        crop = (slice(None), slice(None)) + tuple(slice(0, k) for k in g.kernel)
        return y[crop].transpose(0, 1).contiguous()


class ChannelsLast:
    """``aten`` with the arguments in the channels-last layout (``torch.channels_last``; 2-d convolutions), the
    weight's channels-last copy kept per weight version; the result comes back contiguous (the element kernels
    read contiguous tensors), so the layout is invisible outside the product."""

    name = "channels_last"
    products = PRODUCTS

    def __init__(self, g: ConvGeometry, in_shape: Sequence[int], w_shape: Sequence[int]) -> None:
        self.aten = Aten(g)
        self.weight = WeightCache(lambda w: w.contiguous(memory_format=torch.channels_last))

    @staticmethod
    def applies(g: ConvGeometry, in_shape: Sequence[int]) -> bool:
        return g.dim == 2

    @staticmethod
    def _nhwc(t: Tensor) -> Tensor:
        return t.contiguous(memory_format=torch.channels_last)

    def K(self, w: Tensor, q: Tensor) -> Tensor:
        return self.aten.K(self.weight(w), self._nhwc(q)).contiguous()

    def Kt(self, w: Tensor, c: Tensor, in_shape: Sequence[int]) -> Tensor:
        return self.aten.Kt(self.weight(w), self._nhwc(c), in_shape).contiguous()

    def Kbox(self, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        return self.aten.Kbox(self.weight(w), self._nhwc(x), self._nhwc(c)).contiguous()


FORMULATIONS = (Aten, Dense, Pointwise, Flipped, Swapped, ChannelsLast)
#: the candidates of the timed choice: those that remove work (padding taps, im2col). ``flipped`` and ``swapped``
#: only re-express it; timed alone they can win, but in whole penalties (bench/targets.py: ``swapped`` on the
#: torchvision ResNet-50, ``flipped`` on the CIFAR ResNet-18) the step got slower and peak memory rose, costs their
#: isolated timing does not see. ``force()`` still runs them (tests, benchmarks)
TIMED = (Aten, Dense, Pointwise, ChannelsLast)
_forced: Optional[str] = None


class force:
    """``with dbprop.formulation.force("dense"):`` every convolution product uses that formulation where it
    applies (``aten`` elsewhere), untimed: for tests and benchmarks."""

    def __init__(self, name: Optional[str]) -> None:
        if name is not None and name not in {f.name for f in FORMULATIONS}:
            raise ValueError(f"unknown formulation {name!r}; expected one of {[f.name for f in FORMULATIONS]}")
        self.name = name

    def __enter__(self) -> None:
        global _forced
        self._saved, _forced = _forced, self.name

    def __exit__(self, *exc) -> None:
        global _forced
        _forced = self._saved


class ConvProducts:
    """The three products of one convolution node, each through the formulation chosen for its shape.

    Choices are kept per (product, input shape without the batch, rows, dtype, device); ``chosen()`` lists them."""

    def __init__(self, g: ConvGeometry) -> None:
        self.g = g
        self.aten = Aten(g)
        self._impls: Dict[Hashable, object] = {}          # (class, per-sample in_shape, w_shape) -> instance
        self._used: Dict[Hashable, Hashable] = {}         # this node's keys -> keys of the process-wide choices

    def _impl(self, cls, in_shape: Sequence[int], w_shape: Sequence[int]):
        if cls is Aten:
            return self.aten
        key = (cls, tuple(in_shape[1:]), tuple(w_shape))
        impl = self._impls.get(key)
        if impl is None:
            impl = self._impls.setdefault(key, cls(self.g, in_shape, w_shape))
        return impl

    def _candidates(self, product: str, in_shape: Sequence[int], w: Tensor, among=TIMED):
        return [self._impl(cls, in_shape, w.shape) for cls in among
                if product in cls.products and cls.applies(self.g, in_shape)]

    def _run(self, product: str, in_shape: Sequence[int], w: Tensor, rows: int, dtype, device,
             call: Callable[[object], Tensor]) -> Tensor:
        if _forced is not None:
            impls = [i for i in self._candidates(product, in_shape, w, FORMULATIONS) if i.name == _forced]
            return call(impls[0] if impls else self.aten)
        if not tuning_enabled():
            return call(self.aten)
        candidates = self._candidates(product, in_shape, w)
        if len(candidates) == 1:
            return call(self.aten)
        key = (product, tuple(in_shape[1:]), rows, dtype, str(device))
        shape_key = (self.g, tuple(w.shape), *key)
        self._used[key] = shape_key
        name = _choices.get(shape_key)
        if name is not None:
            return call(next((i for i in candidates if i.name == name), self.aten))
        name, out = _fastest(candidates, call, device)
        _choices.setdefault(shape_key, name)
        return out

    def K(self, w: Tensor, q: Tensor, in_shape: Sequence[int]) -> Tensor:
        return self._run("K", in_shape, w, q.shape[0], q.dtype, q.device, lambda f: f.K(w, q))

    def Kt(self, w: Tensor, c: Tensor, in_shape: Sequence[int]) -> Tensor:
        return self._run("Kt", in_shape, w, c.shape[0], c.dtype, c.device, lambda f: f.Kt(w, c, in_shape))

    def Kbox(self, w: Tensor, x: Tensor, c: Tensor) -> Tensor:
        return self._run("Kbox", x.shape, w, c.shape[0], c.dtype, c.device, lambda f: f.Kbox(w, x, c))

    def chosen(self) -> Dict[Hashable, str]:
        """The formulation of every (product, per-sample input shape, rows, dtype, device) this node ran with a
        choice to make (timed here or by an earlier node of the same shape)."""
        return {key: _choices[shape_key] for key, shape_key in self._used.items() if shape_key in _choices}


#: the process-wide choices: (geometry, weight shape, product, per-sample input shape, rows, dtype, device) -> name
_choices: Dict[Hashable, str] = {}


def _fastest(candidates, call, device) -> Tuple[str, Tensor]:
    """Time each candidate on the real arguments (least of ``TIMED_RUNS`` after a warm-up run); the chosen
    formulation's name (``MARGIN`` favours ``aten``, ``candidates[0]``) and its result."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds, results = [], []
    for impl in candidates:
        r = call(impl)
        best = math.inf
        for _ in range(TIMED_RUNS):
            sync()
            t0 = time.perf_counter()
            r = call(impl)
            sync()
            best = min(best, time.perf_counter() - t0)
        seconds.append(best)
        results.append(r)
    i = min(range(len(candidates)), key=seconds.__getitem__)
    if seconds[i] > MARGIN * seconds[0]:
        i = 0
    return candidates[i].name, results[i]
