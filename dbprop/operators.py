"""The operators of a stage program (DESIGN.md §1).

Every stage op is one of three kinds:

* :class:`Affine`     ``y = K(θ, x) + b`` with its forward ``K``, transpose ``Kᵀ`` (adjoint in ``x``)
  and weight adjoint ``K□`` (adjoint in ``θ``);
* :class:`Routing`    a parameter-free (locally) linear map ``R`` with transpose ``Rᵀ``
  (max-pool through saved indices, average pool, flatten, dropout with a fixed mask, identity);
* :class:`Activation` coordinate-wise (leaky) ReLU; its derivative ``a = g'(z)`` is kept as a mask.

All ops read the live parameters of the wrapped module, so a compiled program never goes stale after an
optimizer step. Cotangents and tangents may carry several directions stacked along the batch
dimension (``k·B`` rows, direction-major); per-sample state (masks, indices) broadcasts over them.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

convolution_backward = torch.ops.aten.convolution_backward


def _per_sample(c: Tensor, saved: Tensor) -> Tensor:
    """View ``c`` of ``k·B`` rows as ``(k, B, ...)`` so that per-sample ``saved`` (``B`` rows) broadcasts."""
    return c.unflatten(0, (-1, saved.shape[0]))


class Op:
    """Base class of a stage op. ``module`` is the nn.Module it came from, ``name`` its path."""

    kind = "op"

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    def forward(self, x: Tensor, keep_input: bool) -> Tuple[Tensor, Any]:
        """Return ``(y, saved)``; ``saved`` is what the other passes need (indices, masks, shapes)."""
        raise NotImplementedError

    def linear(self, q: Tensor, saved: Any) -> Tensor:
        """The linear part of the op applied to a tangent (``K q``, ``R q`` or ``a ⊙ q``)."""
        raise NotImplementedError

    def transpose(self, c: Tensor, saved: Any) -> Tensor:
        """The transpose applied to a cotangent (``Kᵀ c``, ``Rᵀ c`` or ``a ⊙ c``)."""
        raise NotImplementedError

    def descriptor(self) -> Tuple[int, List[int], List[float]]:
        """``(kind, ints, floats)`` describing the op to the native extension (csrc/program.h)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ----------------------------------------------------------------------------------------------- affine
class Affine(Op):
    """``z = K(θ, x) + b``. ``saved`` is ``(x or None, x.shape)``."""

    kind = "affine"

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.module.bias

    def parameters(self) -> List[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def apply_K(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_adjoint(self, x: Tensor, c: Tensor, need_bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``K□(x, c)`` (gradient of ``⟨c, K(θ, x)⟩`` in ``θ``) and, if asked, ``Σ c`` (bias gradient)."""
        raise NotImplementedError

    def bias_gradient(self, c: Tensor) -> Tensor:
        """``Σ c`` over batch and spatial positions."""
        raise NotImplementedError

    def forward(self, x: Tensor, keep_input: bool) -> Tuple[Tensor, Any]:
        z = self.apply_K(x)
        if self.bias is not None:
            z = z + self.bias_view(z)
        return z, (x if keep_input else None, x.shape)

    def bias_view(self, z: Tensor) -> Tensor:
        """The bias shaped to broadcast against an output ``z``."""
        raise NotImplementedError

    def linear(self, q: Tensor, saved: Any) -> Tensor:
        return self.apply_K(q)


class Linear(Affine):
    """``K(W, x) = x Wᵀ``, ``Kᵀ(W, y) = y W``, ``K□(x, y) = yᵀ x`` (over all leading dims)."""

    def apply_K(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def bias_view(self, z):
        return self.bias

    def transpose(self, c: Tensor, saved: Any) -> Tensor:
        return c.matmul(self.weight)

    def weight_adjoint(self, x, c, need_bias):
        dW = c.reshape(-1, c.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        return dW, (self.bias_gradient(c) if need_bias else None)

    def bias_gradient(self, c):
        return c.reshape(-1, c.shape[-1]).sum(0)

    def in_features(self) -> int:
        return self.module.in_features

    def descriptor(self):
        return (0, [], [])


class Conv(Affine):
    """Convolution (1-d or 2-d, any stride, padding incl. 'same', dilation, groups).

    ``K`` is ``aten.convolution``; ``Kᵀ`` and ``K□`` are the input and weight outputs of
    ``aten.convolution_backward`` selected by its output mask, so only the needed one is computed.
    Asymmetric 'same' padding is applied explicitly (pad, then unpadded convolution; crop in ``Kᵀ``).
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        m = module
        self.dim = len(m.kernel_size)
        self.stride = list(m.stride)
        self.dilation = list(m.dilation)
        self.groups = m.groups
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pads = [(0, 0)] * self.dim
            else:  # 'same' (stride 1 is enforced by nn.Conv)
                pads = []
                for d, k in zip(m.dilation, m.kernel_size):
                    total = d * (k - 1)
                    pads.append((total // 2, total - total // 2))
        else:
            pads = [(p, p) for p in m.padding]
        if all(lo == hi for lo, hi in pads):
            self.padding = [lo for lo, _ in pads]
            self.explicit_pad = None
        else:  # F.pad order: last dim first
            self.padding = [0] * self.dim
            self.explicit_pad = [p for lo_hi in reversed(pads) for p in lo_hi]

    def bias_view(self, z):
        return self.bias.view(-1, *([1] * self.dim))

    def _pad(self, x: Tensor) -> Tensor:
        return x if self.explicit_pad is None else F.pad(x, self.explicit_pad)

    def apply_K(self, x: Tensor) -> Tensor:
        return torch.convolution(self._pad(x), self.weight, None, self.stride, self.padding,
                                 self.dilation, False, [0] * self.dim, self.groups)

    def _backward(self, c: Tensor, x: Tensor, mask: Sequence[bool]):
        bias_sizes = [self.weight.shape[0]] if mask[2] else None
        return convolution_backward(c, x, self.weight, bias_sizes, self.stride, self.padding,
                                    self.dilation, False, [0] * self.dim, self.groups, list(mask))

    def transpose(self, c: Tensor, saved: Any) -> Tensor:
        shape = list(saved[1])
        shape[0] = c.shape[0]
        if self.explicit_pad is not None:  # F.pad order: (lo, hi) of the last dim first
            for i in range(self.dim):
                lo, hi = self.explicit_pad[2 * (self.dim - 1 - i):2 * (self.dim - i)]
                shape[2 + i] += lo + hi
        shape_only = c.new_empty(1).expand(shape)
        gx = self._backward(c, shape_only, (True, False, False))[0]
        if self.explicit_pad is not None:
            for i in range(self.dim):
                lo = self.explicit_pad[2 * (self.dim - 1 - i)]
                gx = gx.narrow(2 + i, lo, saved[1][2 + i])
        return gx

    def weight_adjoint(self, x, c, need_bias):
        _, dW, db = self._backward(c, self._pad(x), (False, True, need_bias))
        return dW, (db if need_bias else None)

    def bias_gradient(self, c):
        return c.sum([0, *range(2, c.dim())])

    def in_features(self) -> int:
        return self.module.in_channels

    def descriptor(self):
        pad = self.explicit_pad or []
        return (1, [self.dim, *self.stride, *self.padding, *self.dilation, self.groups, int(bool(pad)), *pad], [])


# ---------------------------------------------------------------------------------------------- routing
class Routing(Op):
    """A parameter-free linear map ``R``; ``linear`` is ``R``, ``transpose`` is ``Rᵀ``."""

    kind = "routing"


class Identity(Routing):
    def descriptor(self):
        return (7, [], [])

    def forward(self, x, keep_input):
        return x, None

    def linear(self, q, saved):
        return q

    def transpose(self, c, saved):
        return c


class Flatten(Routing):
    def descriptor(self):
        return (5, [self.module.start_dim, self.module.end_dim], [])

    def forward(self, x, keep_input):
        return self.module(x), x.shape[1:]

    def linear(self, q, saved):
        return self.module(q)

    def transpose(self, c, saved):
        return c.reshape(c.shape[0], *saved)


class Dropout(Routing):
    """Dropout with its mask drawn once in the forward pass and reused in every other pass (eval: identity)."""

    def descriptor(self):
        m = self.module
        return (7, [], []) if not m.training or m.p == 0.0 else (6, [], [float(m.p)])

    def forward(self, x, keep_input):
        m = self.module
        if not m.training or m.p == 0.0:
            return x, None
        if m.p == 1.0:
            mask = torch.zeros_like(x)
        else:  # the same draw as ATen's CPU dropout: bernoulli(1 − p) / (1 − p)
            mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - m.p).div_(1.0 - m.p)
        return x * mask, mask

    def linear(self, q, saved):
        return q if saved is None else (_per_sample(q, saved) * saved).flatten(0, 1)

    transpose = linear


def _as_2d(value, one_d: bool, height: int = 1) -> List[int]:
    """A pool's kernel / stride / padding / dilation as ``[height, width]``: 1-d pools run as 2-d pools of
    height 1 (``height`` is 0 for padding)."""
    v = list(value) if isinstance(value, (tuple, list)) else [value]
    return [height, v[0]] if one_d else (v if len(v) == 2 else v * 2)


class MaxPool(Routing):
    """Max-pool as routing through the saved argmax indices: ``R q`` gathers, ``Rᵀ c`` scatter-adds."""

    def __init__(self, module, name):
        super().__init__(module, name)
        self.one_d = isinstance(module, nn.MaxPool1d)
        self.pool = F.max_pool1d if self.one_d else F.max_pool2d

    def descriptor(self):
        m, one_d = self.module, self.one_d
        stride = m.stride if m.stride is not None else m.kernel_size
        return (3, [int(one_d), *_as_2d(m.kernel_size, one_d), *_as_2d(stride, one_d), *_as_2d(m.padding, one_d, 0),
                    *_as_2d(m.dilation, one_d), int(m.ceil_mode)], [])

    def forward(self, x, keep_input):
        m = self.module
        y, idx = self.pool(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                           return_indices=True)
        return y, (idx.flatten(2), x.shape[1:], y.shape[1:])

    def linear(self, q, saved):
        idx, in_shape, out_shape = saved
        qs = _per_sample(q.flatten(2), idx)
        out = qs.gather(3, idx.expand(qs.shape[0], *idx.shape))
        return out.reshape(q.shape[0], *out_shape)

    def transpose(self, c, saved):
        idx, in_shape, out_shape = saved
        cs = _per_sample(c.flatten(2), idx)
        out = cs.new_zeros(*cs.shape[:3], math.prod(in_shape[1:]))
        out.scatter_add_(3, idx.expand(cs.shape[0], *idx.shape), cs)
        return out.reshape(c.shape[0], *in_shape)


class AvgPool(Routing):
    """Average pool; ``Rᵀ`` is ``aten.avg_pool2d_backward`` (1-d pools run as 2-d with height 1)."""

    def __init__(self, module, name):
        super().__init__(module, name)
        m = module
        self.one_d = isinstance(m, nn.AvgPool1d)
        self.kernel = _as_2d(m.kernel_size, self.one_d)
        self.stride = _as_2d(m.stride if m.stride is not None else m.kernel_size, self.one_d)
        self.padding = _as_2d(m.padding, self.one_d, 0)
        self.divisor = None if self.one_d else m.divisor_override

    def descriptor(self):
        m = self.module
        return (4, [int(self.one_d), *self.kernel, *self.stride, *self.padding, int(m.ceil_mode),
                    int(m.count_include_pad), int(self.divisor is not None), self.divisor or 0], [])

    def _as2d(self, t: Tensor) -> Tensor:
        return t.unsqueeze(2) if self.one_d else t

    def forward(self, x, keep_input):
        return self.linear(x, (x.shape,)), (x.shape,)

    def linear(self, q, saved):
        m = self.module
        y = F.avg_pool2d(self._as2d(q), self.kernel, self.stride, self.padding, m.ceil_mode,
                         m.count_include_pad, self.divisor)
        return y.squeeze(2) if self.one_d else y

    def transpose(self, c, saved):
        m = self.module
        shape = (c.shape[0], *saved[0][1:])
        shape_only = self._as2d(c.new_empty(1).expand(shape))
        g = torch.ops.aten.avg_pool2d_backward(self._as2d(c), shape_only, self.kernel, self.stride,
                                               self.padding, m.ceil_mode, m.count_include_pad, self.divisor)
        return g.squeeze(2) if self.one_d else g


# ------------------------------------------------------------------------------------------- activation
class Activation(Op):
    """(Leaky) ReLU ``x = g(z)``; ``a = g'(z) ∈ {slope, 1}`` is kept as the boolean mask ``z > 0``."""

    kind = "activation"

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.slope = float(module.negative_slope) if isinstance(module, nn.LeakyReLU) else 0.0

    def descriptor(self):
        return (2, [], [self.slope])

    def forward(self, z, keep_input):
        x = F.relu(z) if self.slope == 0.0 else F.leaky_relu(z, self.slope)
        return x, z > 0

    def linear(self, q, mask):
        """``a ⊙ q`` with ``a = 1`` where the mask is set and ``slope`` elsewhere."""
        qs = _per_sample(q, mask)
        out = qs * mask if self.slope == 0.0 else torch.where(mask, qs, qs * self.slope)
        return out.flatten(0, 1)

    transpose = linear


SUPPORTED = {
    nn.Linear: Linear,
    nn.Conv1d: Conv,
    nn.Conv2d: Conv,
    nn.ReLU: Activation,
    nn.LeakyReLU: Activation,
    nn.MaxPool1d: MaxPool,
    nn.MaxPool2d: MaxPool,
    nn.AvgPool1d: AvgPool,
    nn.AvgPool2d: AvgPool,
    nn.Flatten: Flatten,
    nn.Dropout: Dropout,
    nn.Identity: Identity,
}
