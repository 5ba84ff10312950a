"""The node kinds of a program (docs/maths.md §4): for each, the forward map and the four local operators
the passes need.

A node ``y = φ(θ; y_1..y_m)`` provides

* ``run``         the forward map; returns ``y`` and what the other passes need (``saved``);
* ``tangent``     ``A q``: its Jacobian in the inputs applied to tangents (one per input, ``None`` = 0);
* ``cotangent``   ``Aᵀ c``: one cotangent per input;
* ``mixed``       ``∂_θ ⟨ξ, A(θ) q⟩`` per parameter (the backward-backward term θ̂);
* ``source``      ``∂_{y_m} ⟨ξ, A(y) q⟩`` per input (non-zero only where ``A`` depends on the forward point);
* ``param_grads`` ``Bᵀ η``: the parameter gradient of ``⟨η, φ⟩``.

Tangents and cotangents carry ``k`` directions stacked along the batch (``k·B`` rows, direction-major);
per-sample state broadcasts over them. Sources are summed over the ``k`` copies (``B`` rows). Element work
(activation masks and derivatives) goes through a ``kernels`` object, :class:`PythonKernels` here (the
readable reference) or :class:`dbprop.native.NativeKernels`; everything else is ATen.
All nodes read their module's live parameters, so a program never goes stale after an optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import parametrized
from .formulation import ConvGeometry, ConvProducts

Grads = List[Optional[Tensor]]
Descriptor = Tuple[str, Dict[str, List[float]]]  # a native chain op: kind name and named fields


def per_copy(c: Tensor, batch: int) -> Tensor:
    """View ``c`` of ``k·B`` rows as ``(k, B, ...)`` so that per-sample state (``B`` rows) broadcasts."""
    return c.unflatten(0, (-1, batch))


def _rows(shape: Sequence[int], rows: int) -> List[int]:
    return [rows, *shape[1:]]


def _channel(v: Tensor, dim: int) -> Tensor:
    """View a per-channel vector ``(C,)`` for broadcasting over a ``dim``-d ``(rows, C, ...)`` tensor."""
    return v.view(1, -1, *([1] * (dim - 2)))


def _channel_means(t: Tensor) -> Tensor:
    """``m(·)`` of docs/maths.md §4.9: per-channel means over each copy's batch and spatial positions, ``t`` of
    shape ``(k, B, C, ...)``; keeps the reduced dimensions."""
    return t.mean([1, *range(3, t.dim())], keepdim=True)


def _batchnorm_apply(qs: Tensor, xhat: Tensor, m_q: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """(4.3) of docs/maths.md §4.9 from its moments: ``scale (q − m(q) − x̂ m(x̂ q))``, ``qs`` as ``(k, B, ...)``,
    returned with ``k·B`` rows."""
    return (qs - m_q - xhat * w).flatten(0, 1) * _channel(scale, qs.dim() - 1)


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Smooth:
    """A smooth coordinate-wise activation: ``name`` is its kernel in ``csrc/kernels/activations.h``,
    ``fn`` the torch function it must equal, ``p1, p2`` its parameters."""

    name: str
    fn: Callable[[Tensor], Tensor]
    p1: float = 0.0
    p2: float = 0.0


@dataclass(frozen=True)
class SmoothKind:
    """One row of :data:`SMOOTH_ACTIVATIONS`: the torch function ``g(z, p1, p2)`` the kernels must equal, the module
    type it covers (``applies``: which of its instances), how the module gives ``(p1, p2)``, and the functional
    forms that build that module from their keyword arguments."""

    fn: Callable[[Tensor, float, float], Tensor]
    module: type
    params: Callable[[nn.Module], Tuple[float, float]] = lambda m: (0.0, 0.0)
    applies: Callable[[nn.Module], bool] = lambda m: True
    functions: Tuple[Callable, ...] = ()


def hardsigmoid_reference(z: Tensor) -> Tensor:
    """``F.hardsigmoid`` as an expression autograd can differentiate twice (aten has no double backward for
    ``hardsigmoid_backward``): the same values (computed in float for half types, as ATen does) and PyTorch's
    ``g'`` convention, ``1/6`` on the open interval ``(−3, 3)`` and 0 elsewhere; ``g'' = 0``."""
    w = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return torch.where((w > -3) & (w < 3), (w + 3) / 6, (w >= 3).to(w.dtype)).to(z.dtype)


#: The smooth activations, one row each: kernel name (its row of DBPROP_SMOOTH_ACTIVATIONS in
#: csrc/kernels/activations.h, checked on import) -> :class:`SmoothKind`.
SMOOTH_ACTIVATIONS: Dict[str, SmoothKind] = {
    "gelu": SmoothKind(lambda z, p1, p2: F.gelu(z), nn.GELU, applies=lambda m: m.approximate == "none",
                       functions=(F.gelu,)),
    "gelu_tanh": SmoothKind(lambda z, p1, p2: F.gelu(z, approximate="tanh"), nn.GELU,
                            applies=lambda m: m.approximate == "tanh"),
    "silu": SmoothKind(lambda z, p1, p2: F.silu(z), nn.SiLU, functions=(F.silu,)),
    "elu": SmoothKind(lambda z, alpha, p2: F.elu(z, alpha), nn.ELU, params=lambda m: (float(m.alpha), 0.0),
                      functions=(F.elu,)),
    "softplus": SmoothKind(lambda z, beta, threshold: F.softplus(z, beta, threshold), nn.Softplus,
                           params=lambda m: (float(m.beta), float(m.threshold)), functions=(F.softplus,)),
    "tanh": SmoothKind(lambda z, p1, p2: torch.tanh(z), nn.Tanh, functions=(torch.tanh, F.tanh)),
    "sigmoid": SmoothKind(lambda z, p1, p2: torch.sigmoid(z), nn.Sigmoid, functions=(torch.sigmoid, F.sigmoid)),
    "mish": SmoothKind(lambda z, p1, p2: F.mish(z), nn.Mish, functions=(F.mish,)),
    # piecewise quadratic / linear: g' and g'' with PyTorch's conventions at z = ±3 (csrc/kernels/activations.h)
    "hardswish": SmoothKind(lambda z, p1, p2: F.hardswish(z), nn.Hardswish, functions=(F.hardswish,)),
    "hardsigmoid": SmoothKind(lambda z, p1, p2: hardsigmoid_reference(z), nn.Hardsigmoid,
                              functions=(F.hardsigmoid,)),
}


def smooth_of(m: nn.Module) -> "Smooth":
    """The :class:`Smooth` activation of module ``m`` (its row of :data:`SMOOTH_ACTIVATIONS`)."""
    for name, row in SMOOTH_ACTIVATIONS.items():
        if type(m) is row.module and row.applies(m):
            p1, p2 = row.params(m)
            return Smooth(name, lambda z, fn=row.fn, p1=p1, p2=p2: fn(z, p1, p2), p1, p2)
    raise KeyError(f"no smooth activation covers {type(m).__name__}")


@dataclass(frozen=True)
class PiecewiseLinear:
    """``g`` with ``g' = 1`` on ``lo < z < hi`` and ``slope`` elsewhere (ReLU, LeakyReLU, ReLU6, Hardtanh)."""

    fn: Callable[[Tensor], Tensor]
    lo: float = 0.0
    hi: float = math.inf
    slope: float = 0.0


class PythonKernels:
    """The element work of the nodes in plain PyTorch: masks as bool tensors, ``g'`` and ``g''`` by autograd
    of the activation's own torch function (its definition)."""

    name = "python"

    def piecewise_forward(self, z: Tensor, act: PiecewiseLinear) -> Tuple[Tensor, Any]:
        inside = z > act.lo
        if act.hi < math.inf:
            inside &= z < act.hi
        return act.fn(z), inside

    def mask_multiply(self, c: Tensor, mask: Tensor, act: PiecewiseLinear) -> Tensor:
        """``a ⊙ c`` with ``a = 1`` inside the mask and ``slope`` outside."""
        cs = per_copy(c, mask.shape[0])
        out = cs * mask if act.slope == 0.0 else torch.where(mask, cs, cs * act.slope)
        return out.flatten(0, 1)

    def smooth_forward(self, z: Tensor, act: Smooth) -> Tuple[Tensor, Any]:
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            d1 = torch.autograd.grad(act.fn(zr).sum(), zr, create_graph=True)[0]
            # g' constant in z (hardsigmoid's reference): g'' = 0
            d2 = torch.autograd.grad(d1.sum(), zr)[0] if d1.requires_grad else torch.zeros_like(d1)
        return act.fn(z), (d1.detach(), d2)

    def smooth_multiply(self, c: Tensor, saved: Any, act: Smooth) -> Tensor:
        d1 = saved[0]
        return (per_copy(c, d1.shape[0]) * d1).flatten(0, 1)

    def smooth_source(self, xi: Tensor, q: Tensor, saved: Any, act: Smooth) -> Tensor:
        """``Σ_copies g''(z) ⊙ ξ ⊙ q`` (docs/maths.md §4.8)."""
        d2 = saved[1]
        return (per_copy(xi, d2.shape[0]) * per_copy(q, d2.shape[0])).sum(0) * d2

    def batchnorm_train_linear(self, q: Tensor, xhat: Tensor, scale: Tensor) -> Tensor:
        """Train-mode BatchNorm ``A q = scale (q − m(q) − x̂ m(x̂ q))`` (docs/maths.md §4.9 (4.3)) for ``q`` of
        ``k·B`` rows and the saved ``x̂`` of ``B`` rows; ``A`` is self-adjoint, so this is also ``Aᵀ q``."""
        qs = per_copy(q, xhat.shape[0])
        return _batchnorm_apply(qs, xhat, _channel_means(qs), _channel_means(xhat * qs), scale)

    def batchnorm_train_bbp(self, xi: Optional[Tensor], q: Tensor, xhat: Tensor, invstd: Tensor,
                            gamma: Optional[Tensor], need_tangent: bool, want_source: bool, want_mixed: bool):
        """Train-mode BatchNorm ``(A q, ŝ, θ̂_γ)`` from one set of moments (docs/maths.md §4.9), each ``None``
        unless asked: with ``m_q = m(q)``, ``w = m(x̂ q)``, ``u = m(ξ x̂)``, ``cov = m(ξ q) − m(ξ) m(q)`` per copy,
        ``A q = (γ/σ)(q − m_q − x̂ w)`` (4.3), ``ŝ = (γ/σ²) Σ_k [(3uw − cov) x̂ − w (ξ − m(ξ)) − u (q − m_q)]``
        (4.6) and ``θ̂_γ = (N/σ) Σ_k (cov − u w)`` (4.5). ``gamma=None`` means ``γ = 1``."""
        if (want_source or want_mixed) and xi is None:
            raise RuntimeError("batchnorm_train_bbp: xi is required for the source and the mixed term")
        qs, dim = per_copy(q, xhat.shape[0]), q.dim()
        scale = invstd if gamma is None else gamma * invstd
        m_q, w = _channel_means(qs), _channel_means(xhat * qs)
        tangent = _batchnorm_apply(qs, xhat, m_q, w, scale) if need_tangent else None
        source = dgamma = None
        if want_source or want_mixed:
            xis = per_copy(xi, xhat.shape[0])
            m_xi, u = _channel_means(xis), _channel_means(xis * xhat)
            cov = _channel_means(xis * qs) - m_xi * m_q
            if want_source:
                s = (3 * u * w - cov) * xhat - w * (xis - m_xi) - u * (qs - m_q)
                source = s.sum(0) * _channel(scale * invstd, dim)
            if want_mixed:
                n = xhat.numel() // xhat.shape[1]
                dgamma = n * invstd * (cov - u * w).sum(0).flatten()
        return tangent, source, dgamma


@dataclass
class RunContext:
    """What a forward pass tells its nodes: keep inputs for ``Bᵀη``? update BatchNorm running statistics?
    ``values``: the pass's own traced values so far (sizes, constants), which opaque and reshape nodes read for
    the arguments of their traced call that are not node inputs."""

    kernels: Any
    keep_inputs: bool
    update_stats: bool
    batch: int
    values: Mapping[Any, Any] = field(default_factory=dict)
    #: per input of the node being run: does it depend on ``x`` (rows per sample)? The others are constants of
    #: the program (parameter leaves, docs/maths.md §4.14). ``None``: every input does.
    per_sample: Optional[Sequence[bool]] = None

    def input_per_sample(self, xs: Sequence[Tensor]) -> List[bool]:
        return [True] * len(xs) if self.per_sample is None else list(self.per_sample)


# ----------------------------------------------------------------------------------------------- base
class Op:
    """A node kind. ``name`` is where it came from in the model (module path or traced call).

    A kind declares what it covers (the front-end, dbprop/program.py, reads these): ``modules``, the module types
    that become this node (built by ``from_module(name, module)``), ``functions`` and ``methods``, functional forms
    and tensor methods mapped to the module type they stand for (built from their keyword arguments), and
    ``chain_kinds``, the rows of the native chain driver's table its ``descriptor()`` may return."""

    kind = "op"
    modules: Tuple[type, ...] = ()
    functions: Dict[Callable, type] = {}
    methods: Dict[str, type] = {}
    chain_kinds: Tuple[str, ...] = ()  # the names its ``descriptor()`` may return (DBPROP_CHAIN_KINDS rows)
    native = True        # runs through ATen / the element kernels (False: local autograd, an opaque node)
    has_source = False   # A depends on the forward point (smooth activations, train BN, opaque nodes)

    def __init__(self, name: str, module: Optional[nn.Module] = None) -> None:
        self.name = name
        self.module = module

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> "Op":
        return cls(name, module)

    def params(self) -> List[Tensor]:
        """The parameters ``θ`` of this node (live tensors of its module)."""
        return []

    def param_sources(self) -> List[Optional[Tuple[nn.Module, str]]]:
        """Per entry of ``params()``: ``(module, name)`` where it is a parametrized tensor read once per call and
        chained to its parametrization's parameters (dbprop/parametrized.py), else ``None``."""
        return [None] * len(self.params())

    def run(self, xs: List[Tensor], ctx: RunContext) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def tangent(self, qs: List[Optional[Tensor]], saved: Any, K) -> Tensor:
        raise NotImplementedError

    def cotangent(self, c: Tensor, saved: Any, K) -> List[Optional[Tensor]]:
        raise NotImplementedError

    def mixed(self, xi: Tensor, qs: List[Optional[Tensor]], saved: Any, want: List[bool], K) -> Grads:
        return [None] * len(want)

    def source(self, xi: Tensor, qs: List[Optional[Tensor]], saved: Any, K) -> Grads:
        return [None] * len(qs)

    def param_grads(self, eta: Tensor, saved: Any, want: List[bool], K) -> Grads:
        return [None] * len(want)

    # The passes call these three; opaque nodes override them to share one local autograd call.
    def backward_step(self, c: Tensor, saved: Any, K) -> List[Optional[Tensor]]:
        return self.cotangent(c, saved, K)

    def bbp_step(self, xi: Optional[Tensor], qs, saved, want: List[bool], need_tangent: bool, K):
        """``(A q, mixed terms, sources)``; ``xi`` is ``None`` where no mixed term or source is needed."""
        q = self.tangent(qs, saved, K) if need_tangent else None
        if xi is None:
            return q, [None] * len(want), [None] * len(qs)
        mixed = self.mixed(xi, qs, saved, want, K) if any(want) else [None] * len(want)
        src = self.source(xi, qs, saved, K) if self.has_source else [None] * len(qs)
        return q, mixed, src

    def fbp_step(self, eta: Tensor, saved: Any, want_inputs: bool, want: List[bool], K):
        """``(Aᵀ η per input or None, Bᵀ η per parameter)``."""
        return (self.cotangent(eta, saved, K) if want_inputs else None,
                self.param_grads(eta, saved, want, K) if any(want) else [None] * len(want))

    def descriptor(self) -> Optional[Descriptor]:
        """``(kind name, {field: [numbers]})`` for the native chain program, or ``None``: the kind's row of
        ``DBPROP_CHAIN_KINDS`` and the fields its struct reads (csrc/program.h), checked when the program is built."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Unary(Op):
    """A node with one input: ``forward``/``linear``/``transpose`` act on one tensor."""

    def forward(self, x: Tensor, ctx: RunContext) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def linear(self, q: Tensor, saved: Any, K) -> Tensor:
        raise NotImplementedError

    def transpose(self, c: Tensor, saved: Any, K) -> Tensor:
        raise NotImplementedError

    def run(self, xs, ctx):
        return self.forward(xs[0], ctx)

    def tangent(self, qs, saved, K):
        return self.linear(qs[0], saved, K)

    def cotangent(self, c, saved, K):
        return [self.transpose(c, saved, K)]


# --------------------------------------------------------------------------------------------- affine
class WeightAndBias:
    """For node kinds whose parameters are their module's ``weight`` and ``bias`` (either may be ``None``)."""

    module: Any

    @property
    def weight(self) -> Optional[Tensor]:
        return self.module.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.module.bias

    def params(self):
        return [p for p in (self.weight, self.bias) if p is not None]


class Parametrizable(WeightAndBias):
    """Weight and bias that may be parametrized (``torch.nn.utils.parametrize``, docs/maths.md §4.16): read as
    the call's pinned value (dbprop/parametrized.py)."""

    @property
    def weight(self) -> Optional[Tensor]:
        return parametrized.tensor(self.module, "weight")

    @property
    def bias(self) -> Optional[Tensor]:
        return parametrized.tensor(self.module, "bias")

    def param_sources(self):
        m = self.module
        return [(m, name) if isinstance(m, nn.Module) and parametrized.is_parametrized(m, name) else None
                for name, p in (("weight", self.weight), ("bias", self.bias)) if p is not None]


class Affine(Parametrizable, Unary):
    """``y = K(W, x) + b``: ``K`` forward, ``Kᵀ`` transpose, ``K□`` weight adjoint (docs/maths.md §4.1).
    ``saved`` is ``(x or None, x.shape)``."""

    kind = "affine"

    def apply_K(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_adjoint(self, x: Tensor, c: Tensor, need_bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``K□(x, c)`` (gradient of ``⟨c, K(W, x)⟩`` in ``W``) and, if asked, ``Σ c`` (bias gradient)."""
        raise NotImplementedError

    def bias_gradient(self, c: Tensor) -> Tensor:
        raise NotImplementedError

    def linear(self, q, saved, K):
        return self.apply_K(q)

    def mixed(self, xi, qs, saved, want, K):  # θ̂ += K□(q_in, ζ); the bias has no mixed term
        return [self.weight_adjoint(qs[0], xi, False)[0] if want[0] else None] + [None] * (len(want) - 1)

    def param_grads(self, eta, saved, want, K):
        need_b = len(want) > 1 and want[1]
        if want[0]:
            if saved[0] is None:
                raise RuntimeError(f"{self.name}: the forward pass did not keep its input")
            dW, db = self.weight_adjoint(saved[0], eta, need_b)
        else:
            dW, db = None, (self.bias_gradient(eta) if need_b else None)
        return [dW, db][:len(want)]


class Linear(Affine):
    """``K(W, x) = x Wᵀ``, ``Kᵀ(W, c) = c W``, ``K□(x, c) = cᵀ x`` (over all leading dims)."""

    chain_kinds = ("linear",)
    modules = (nn.Linear,)

    def forward(self, x, ctx):
        return F.linear(x, self.weight, self.bias), (x if ctx.keep_inputs else None, x.shape)

    def apply_K(self, x):
        return F.linear(x, self.weight)

    def transpose(self, c, saved, K):
        return c.matmul(self.weight)

    def weight_adjoint(self, x, c, need_bias):
        dW = c.reshape(-1, c.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        return dW, (self.bias_gradient(c) if need_bias else None)

    def bias_gradient(self, c):
        return c.reshape(-1, c.shape[-1]).sum(0)

    def descriptor(self):
        return ("linear", {})


class Conv(Affine):
    """Convolution (1-d or 2-d, any stride, padding incl. 'same', dilation, groups; zero padding).

    ``K``, ``Kᵀ`` and ``K□`` go through :class:`dbprop.formulation.ConvProducts`: per shape, the fastest of
    ``aten.convolution`` / ``aten.convolution_backward`` (output mask selecting one gradient), a dense matrix
    for small maps and channel GEMMs for 1×1 kernels (docs/maths.md §4.1).
    """

    chain_kinds = ("conv",)
    modules = (nn.Conv1d, nn.Conv2d)

    def __init__(self, name, module):
        super().__init__(name, module)
        m = module
        self.dim = len(m.kernel_size)
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pads = [(0, 0)] * self.dim
            else:  # 'same' (stride 1 is enforced by nn.Conv)
                pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(m.dilation, m.kernel_size)]
        else:
            pads = [(p, p) for p in m.padding]
        self.products = ConvProducts(ConvGeometry(self.dim, tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation),
                                                  m.groups, tuple(pads)))

    def forward(self, x, ctx):  # the module's own convolution (padding modes), with the node's weight and bias
        return self.module._conv_forward(x, self.weight, self.bias), (x if ctx.keep_inputs else None, x.shape)

    def apply_K(self, x):
        return self.products.K(self.weight, x, x.shape)

    def transpose(self, c, saved, K):
        return self.products.Kt(self.weight, c, saved[1])

    def weight_adjoint(self, x, c, need_bias):
        return self.products.Kbox(self.weight, x, c), (self.bias_gradient(c) if need_bias else None)

    def bias_gradient(self, c):
        return c.sum([0, *range(2, c.dim())])

    def descriptor(self):
        g, aten = self.products.g, self.products.aten
        return ("conv", dict(stride=list(g.stride), padding=aten.padding, dilation=list(g.dilation), groups=[g.groups],
                             pad=aten.explicit_pad or []))


# --------------------------------------------------------------------------------------- batch norm
class BatchNorm(Unary):
    """BatchNorm1d/2d (docs/maths.md §4.9). Eval mode (running statistics): the per-channel affine map
    ``y = γ (x − μ)/σ + β``. Train mode (batch statistics, or ``track_running_stats=False``): with
    ``x̂ = (x − μ_B)/σ_B`` and means ``m(·)`` over the ``N`` = batch·spatial elements of each channel
    (and of each class copy),
        ``A q = (γ/σ)(q − m(q) − x̂ m(x̂ q))``  (symmetric: ``Aᵀ`` has the same form),
        mixed ``∂_γ = (N/σ)(cov(ξ, q) − u w)``, ``u = m(ξ x̂)``, ``w = m(x̂ q)``,
        source ``ŝ = (γ/σ²)[(3uw − cov(ξ, q)) x̂ − w (ξ − m(ξ)) − u (q − m(q))]``.
    ``saved`` is ``(x̂ or x, 1/σ per channel, batch statistics?)``."""

    kind = "batchnorm"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d)

    @property
    def batch_stats(self) -> bool:
        m = self.module
        return m.training or not m.track_running_stats or m.running_mean is None

    @property
    def has_source(self) -> bool:  # type: ignore[override]
        return self.batch_stats

    def params(self):
        m = self.module
        return [m.weight, m.bias] if m.affine else []

    def _gamma(self, invstd: Tensor) -> Tensor:
        return invstd if self.module.weight is None else self.module.weight * invstd

    def forward(self, x, ctx):
        m = self.module
        if x.dim() not in (2, 3, 4):
            raise RuntimeError(f"{self.name}: BatchNorm input must be 2-, 3- or 4-d, got shape {tuple(x.shape)}")
        dims = [0, *range(2, x.dim())]
        if self.batch_stats:
            factor = 0.0 if m.momentum is None else m.momentum
            update = ctx.update_stats and m.training and m.track_running_stats
            if update and m.num_batches_tracked is not None:  # exactly nn.BatchNorm's bookkeeping
                m.num_batches_tracked.add_(1)
                factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            y = F.batch_norm(x, m.running_mean if update else None, m.running_var if update else None, m.weight,
                             m.bias, True, factor, m.eps)
            var, mean = torch.var_mean(x, dims, correction=0)
            invstd = torch.rsqrt(var + m.eps)
            xhat = (x - _channel(mean, x.dim())) * _channel(invstd, x.dim())
            return y, (xhat, invstd, True)
        y = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        invstd = torch.rsqrt(m.running_var + m.eps)
        return y, (x if ctx.keep_inputs else None, invstd, False)

    # Train mode: the maths of (4.3)-(4.6) lives in the kernels (K.batchnorm_train_*), the Python reference
    # being PythonKernels; eval mode is a per-channel diagonal map (4.2).
    def linear(self, q, saved, K):
        aux, invstd, train = saved
        if train:
            return K.batchnorm_train_linear(q, aux, self._gamma(invstd))
        return q * _channel(self._gamma(invstd), q.dim())

    transpose = linear

    def mixed(self, xi, qs, saved, want, K):
        if not want[0]:
            return [None, None]
        aux, invstd, train = saved
        if train:  # (4.5), summed over class copies
            return [K.batchnorm_train_bbp(xi, qs[0], aux, invstd, self.module.weight, False, False, True)[2], None]
        return [(xi * qs[0]).sum([0, *range(2, xi.dim())]) * invstd, None]  # ∂_γ ⟨ξ, (γ/σ) q⟩ = Σ ξ q / σ

    def source(self, xi, qs, saved, K):  # train mode only (has_source): (4.6), summed over class copies
        xhat, invstd, _ = saved
        return [K.batchnorm_train_bbp(xi, qs[0], xhat, invstd, self.module.weight, False, True, False)[1]]

    def bbp_step(self, xi, qs, saved, want, need_tangent, K):
        """Train mode: tangent, mixed term and source from one set of moments (one kernel call)."""
        aux, invstd, train = saved
        if not train:
            return super().bbp_step(xi, qs, saved, want, need_tangent, K)
        want_mixed = xi is not None and bool(want) and want[0]
        q, src, dgamma = K.batchnorm_train_bbp(xi, qs[0], aux, invstd, self.module.weight, need_tangent,
                                               xi is not None, want_mixed)
        return q, ([dgamma] + [None] * (len(want) - 1) if want else []), [src]

    def param_grads(self, eta, saved, want, K):
        if not any(want):
            return [None] * len(want)
        aux, invstd, train = saved
        dims = [0, *range(2, eta.dim())]
        dgamma = None
        if want[0]:
            if train:
                xhat = aux
            else:
                if aux is None:
                    raise RuntimeError(f"{self.name}: the forward pass did not keep its input")
                m = self.module
                xhat = (aux - _channel(m.running_mean, aux.dim())) * _channel(invstd, aux.dim())
            dgamma = (eta * xhat).sum(dims)
        return [dgamma, eta.sum(dims) if want[1] else None]


# ------------------------------------------------------------------------- per-sample norms (LN, GN, IN)
def _group_means(t: Tensor) -> Tensor:
    """``m(·)`` of docs/maths.md §4.13: means over each group's ``n`` elements (the last axis), kept."""
    return t.mean(-1, keepdim=True)


def _sample_norm_apply(qs: Tensor, xhat: Tensor, invstd: Tensor) -> Tensor:
    """The normalisation Jacobian ``J q = (1/σ)(q − m(q) − x̂ m(x̂ q))`` (docs/maths.md §4.13 (4.14)) per group,
    ``qs`` as ``(k, B, R, n)``, ``x̂`` ``(B, R, n)`` and ``1/σ`` ``(B, R, 1)``; ``J`` is self-adjoint."""
    return (qs - _group_means(qs) - xhat * _group_means(xhat * qs)) * invstd


@dataclass
class NormArgs:
    """What a functional norm call (``F.layer_norm``, ``F.group_norm``, ``F.instance_norm``) gives a
    :class:`SampleNorm` in place of a module: its weight and bias (live parameters or ``None``) and ``eps``;
    input statistics only."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    training: bool = False
    track_running_stats: bool = False
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    momentum: Optional[float] = None


class SampleNorm(WeightAndBias, Unary):
    """LayerNorm, GroupNorm and InstanceNorm (docs/maths.md §4.13): ``y = γ ⊙ x̂ + β`` with ``x̂ = (x − μ)/σ``
    and ``μ``, ``σ² = m((x − μ)²)`` (biased) + ε taken over groups of each sample's elements: the trailing
    ``normalized_shape`` (LayerNorm; one group per leading index), ``C/G`` channels with their positions
    (GroupNorm), one channel (InstanceNorm: GroupNorm with ``G = C``). Statistics are per sample, so the class
    copies share them and nothing couples the batch. With ``J`` the normalisation Jacobian of each group,
        ``A q = γ ⊙ J q``,  ``Aᵀ c = J (γ ⊙ c)``,  mixed ``∂_γ = Σ ξ ⊙ J q``, none for β,
        source ``ŝ = (1/σ²)[(3u'w − cov(ξ', q)) x̂ − w (ξ' − m(ξ')) − u' (q − m(q))]`` with ``ξ' = γ ⊙ ξ``,
        ``u' = m(ξ' x̂)``, ``w = m(x̂ q)``.
    ``γ`` is elementwise over ``normalized_shape`` (LayerNorm) or per channel (GroupNorm, InstanceNorm).
    InstanceNorm in eval mode with running statistics is a per-channel affine map: a :class:`BatchNorm` node.
    ``module`` is the norm module or, for the functional forms, a :class:`NormArgs`. ``saved`` is ``(x̂ as (B, R, n), 1/σ as (B, R, 1), x.shape)``."""

    kind = "sample-norm"
    has_source = True
    modules = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)

    def __init__(self, name: str, module: Any, layout: str, groups: int = 1,
                 normalized_shape: Tuple[int, ...] = ()):
        super().__init__(name, module)
        self.layout, self.groups, self.normalized_shape = layout, groups, tuple(normalized_shape)

    @classmethod
    def from_module(cls, name, m):
        if isinstance(m, nn.LayerNorm):
            return cls(name, m, "layer", normalized_shape=tuple(m.normalized_shape))
        if isinstance(m, nn.GroupNorm):
            return cls(name, m, "group", groups=m.num_groups)
        if not m.training and m.track_running_stats:  # running statistics: y = γ (x − μ_r)/σ_r + β
            return BatchNorm(name, m)
        return cls(name, m, "instance")

    def _want(self, want: List[bool]) -> Tuple[bool, bool]:
        """``want`` (one flag per entry of ``params()``) as (γ wanted, β wanted)."""
        it = iter(want)
        return (self.weight is not None and next(it)), (self.bias is not None and next(it))

    def _scale(self, t: Tensor) -> Tensor:
        """``γ ⊙ t`` (identity without affine weight)."""
        w = self.weight
        if w is None:
            return t
        return t * w if self.layout == "layer" else t * _channel(w, t.dim())

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` (input layout, any number of rows) to the shape of ``γ`` / ``β``."""
        if self.layout == "layer":
            return t.reshape(-1, *self.normalized_shape).sum(0)
        return t.sum([0, *range(2, t.dim())])

    def _groups_of(self, x: Tensor) -> Tuple[int, int]:
        """``(R, n)``: groups per sample and elements per group of ``x``; refuses shapes the kind does not cover."""
        if self.layout == "layer":
            ns = self.normalized_shape
            if x.dim() <= len(ns) or tuple(x.shape[x.dim() - len(ns):]) != ns:
                raise UnsupportedOp(f"{self.name}: LayerNorm over {list(ns)} of an input of shape {tuple(x.shape)}; "
                                    "dbprop needs the batch dimension outside normalized_shape")
            n = math.prod(ns)
            return x[0].numel() // n, n
        want_dim = {nn.InstanceNorm1d: (3,), nn.InstanceNorm2d: (4,)}.get(type(self.module), (3, 4, 5))
        if x.dim() < 2 or (self.layout == "instance" and x.dim() not in want_dim):
            raise UnsupportedOp(f"{self.name}: {self.layout} norm of an input of shape {tuple(x.shape)} "
                                f"(dbprop needs a batched input)")
        groups = x.shape[1] if self.layout == "instance" else self.groups  # InstanceNorm: one group per channel
        return groups, x[0].numel() // groups

    def forward(self, x, ctx):
        m = self.module
        R, n = self._groups_of(x)
        if self.layout == "layer":
            y = F.layer_norm(x, self.normalized_shape, m.weight, m.bias, m.eps)
        elif self.layout == "group":
            y = F.group_norm(x, self.groups, m.weight, m.bias, m.eps)
        else:  # instance: the module's own call, running statistics updated as one forward would
            update = ctx.update_stats and m.training and m.track_running_stats
            y = F.instance_norm(x, m.running_mean if update else None, m.running_var if update else None, m.weight,
                                m.bias, True, 0.0 if m.momentum is None else m.momentum, m.eps)
        xv = x.reshape(x.shape[0], R, n)
        var, mean = torch.var_mean(xv, -1, correction=0, keepdim=True)
        invstd = torch.rsqrt(var + m.eps)
        return y, ((xv - mean) * invstd, invstd, x.shape)

    def _jacobian(self, q: Tensor, saved) -> Tensor:
        xhat, invstd, _ = saved
        qs = per_copy(q, xhat.shape[0]).reshape(-1, *xhat.shape)
        return _sample_norm_apply(qs, xhat, invstd).reshape(q.shape)

    def linear(self, q, saved, K):
        return self._scale(self._jacobian(q, saved))

    def transpose(self, c, saved, K):
        return self._jacobian(self._scale(c), saved)

    def mixed(self, xi, qs, saved, want, K):
        want_w, _ = self._want(want)
        out: Grads = [None] * len(want)
        if want_w:  # ∂_γ ⟨ξ, γ ⊙ J q⟩ = Σ ξ ⊙ J q, summed over class copies
            out[0] = self._reduce(xi * self._jacobian(qs[0], saved))
        return out

    def source(self, xi, qs, saved, K):  # (4.16), summed over class copies
        xhat, invstd, shape = saved
        rows = (-1, *xhat.shape)
        xis = per_copy(self._scale(xi), xhat.shape[0]).reshape(rows)
        qs_ = per_copy(qs[0], xhat.shape[0]).reshape(rows)
        m_q, w = _group_means(qs_), _group_means(xhat * qs_)
        m_xi, u = _group_means(xis), _group_means(xis * xhat)
        cov = _group_means(xis * qs_) - m_xi * m_q
        s = (3 * u * w - cov) * xhat - w * (xis - m_xi) - u * (qs_ - m_q)
        return [(s.sum(0) * invstd * invstd).reshape(shape)]

    def param_grads(self, eta, saved, want, K):
        want_w, want_b = self._want(want)
        xhat, _, shape = saved
        out = []
        if self.weight is not None:
            out.append(self._reduce(eta * xhat.reshape(shape)) if want_w else None)
        if self.bias is not None:
            out.append(self._reduce(eta) if want_b else None)
        return out


# ---------------------------------------------------------------------------------------- activations
class PiecewiseLinearActivation(Unary):
    """ReLU / LeakyReLU / ReLU6 / Hardtanh: ``a = g'(z)`` kept as a mask (bits natively); source 0 a.e."""

    kind = "piecewise-linear"
    chain_kinds = ("activation",)  # (leaky) ReLU only
    modules = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)
    functions = {F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, F.leaky_relu: nn.LeakyReLU,
                 F.hardtanh: nn.Hardtanh}
    methods = {"relu": nn.ReLU, "relu_": nn.ReLU}

    def __init__(self, name, module, act: PiecewiseLinear):
        super().__init__(name, module)
        self.act = act

    @classmethod
    def from_module(cls, name, m):
        if isinstance(m, nn.LeakyReLU):
            s = float(m.negative_slope)
            act = PiecewiseLinear(lambda z: F.leaky_relu(z, s), slope=s)
        elif isinstance(m, nn.ReLU6):
            act = PiecewiseLinear(F.relu6, 0.0, 6.0)
        elif isinstance(m, nn.Hardtanh):
            lo, hi = float(m.min_val), float(m.max_val)
            act = PiecewiseLinear(lambda z: F.hardtanh(z, lo, hi), lo, hi)
        else:
            act = PiecewiseLinear(F.relu)
        return cls(name, m, act)

    def forward(self, z, ctx):
        return ctx.kernels.piecewise_forward(z, self.act)

    def linear(self, q, saved, K):
        return K.mask_multiply(q, saved, self.act)

    transpose = linear

    def descriptor(self):
        act = self.act
        return ("activation", dict(slope=[act.slope])) if act.lo == 0.0 and act.hi == math.inf else None


class SmoothActivation(Unary):
    """GELU, SiLU, ELU, Softplus, Tanh, Sigmoid, Mish, Hardswish, Hardsigmoid: ``A = diag g'(z)``, source ``g''(z) ⊙ ξ ⊙ q``."""

    kind = "smooth"
    has_source = True
    modules = tuple(dict.fromkeys(row.module for row in SMOOTH_ACTIVATIONS.values()))
    functions = {f: row.module for row in SMOOTH_ACTIVATIONS.values() for f in row.functions}
    methods = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

    def __init__(self, name, module, act: Smooth):
        super().__init__(name, module)
        self.act = act

    @classmethod
    def from_module(cls, name, m):
        return cls(name, m, smooth_of(m))

    def forward(self, z, ctx):
        return ctx.kernels.smooth_forward(z, self.act)

    def linear(self, q, saved, K):
        return K.smooth_multiply(q, saved, self.act)

    transpose = linear

    def source(self, xi, qs, saved, K):
        return [K.smooth_source(xi, qs[0], saved, self.act)]


# -------------------------------------------------------------------------------------------- routing
class Identity(Unary):
    """Identity and eval-mode dropout."""

    kind = "identity"
    chain_kinds = ("identity",)
    modules = (nn.Identity,)

    def forward(self, x, ctx):
        return x, None

    def linear(self, q, saved, K):
        return q

    transpose = linear

    def descriptor(self):
        return ("identity", {})


class Dropout(Unary):
    """Dropout with its mask drawn once in the forward pass and reused in every other pass (eval: identity)."""

    kind = "dropout"
    chain_kinds = ("dropout", "identity")  # identity in eval mode
    modules = (nn.Dropout,)

    def _active(self) -> bool:
        return self.module.training and self.module.p > 0.0

    def forward(self, x, ctx):
        p = self.module.p
        if not self._active():
            return x, None
        if p == 1.0:
            mask = torch.zeros_like(x)
        else:  # the same draw as ATen's CPU dropout: bernoulli(1 − p) / (1 − p)
            mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p).div_(1.0 - p)
        return x * mask, mask

    def linear(self, q, saved, K):
        return q if saved is None else (per_copy(q, saved.shape[0]) * saved).flatten(0, 1)

    transpose = linear

    def descriptor(self):
        return ("dropout", dict(p=[float(self.module.p)])) if self._active() else ("identity", {})


class Reshape(Unary):
    """``flatten`` / ``view`` / ``reshape`` keeping the batch dimension: a relabelling of each sample's
    elements, so ``A q`` reshapes to the output's per-sample shape and ``Aᵀ`` back. ``fn(tensors, values)``
    is the reshape on ``[x]`` (``values`` as in :class:`RunContext`, e.g. a traced ``x.size(0)``)."""

    kind = "reshape"
    chain_kinds = ("flatten",)  # flatten only
    modules = (nn.Flatten, nn.Unflatten)

    def __init__(self, name, fn: Callable[[Sequence[Tensor], Mapping], Tensor],
                 flatten_dims: Optional[Tuple[int, int]] = None):
        super().__init__(name)
        self.fn, self.flatten_dims = fn, flatten_dims

    @classmethod
    def from_module(cls, name, m):
        dims = (m.start_dim, m.end_dim) if isinstance(m, nn.Flatten) else None
        return cls(name, lambda tensors, values: m(*tensors), dims)

    def forward(self, x, ctx):
        y = self.fn([x], ctx.values)
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise UnsupportedOp(f"{self.name} reshapes across the batch dimension ({tuple(x.shape)} -> "
                                f"{tuple(y.shape)}); dbprop needs every tensor to keep the batch first")
        return y, (x.shape, y.shape)

    def linear(self, q, saved, K):
        return q.reshape(_rows(saved[1], q.shape[0]))

    def transpose(self, c, saved, K):
        return c.reshape(_rows(saved[0], c.shape[0]))

    def descriptor(self):
        if self.flatten_dims is None:
            return None
        return ("flatten", dict(start_dim=[self.flatten_dims[0]], end_dim=[self.flatten_dims[1]]))


def _as_2d(value, one_d: bool, height: int = 1) -> List[int]:
    """A pool's kernel / stride / padding / dilation as ``[height, width]``: 1-d pools run as 2-d pools of
    height 1 (``height`` is 0 for padding)."""
    v = list(value) if isinstance(value, (tuple, list)) else [value]
    return [height, v[0]] if one_d else (v if len(v) == 2 else v * 2)


class MaxPool(Unary):
    """Max-pool as routing through the saved argmax indices: ``R q`` gathers, ``Rᵀ c`` scatter-adds."""

    kind = "maxpool"
    chain_kinds = ("maxpool",)
    modules = (nn.MaxPool1d, nn.MaxPool2d)
    functions = {F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d}

    def __init__(self, name, module, one_d: bool, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__(name, module)
        self.one_d = one_d
        stride = kernel_size if stride is None or stride == [] else stride
        self.kernel, self.stride = _as_2d(kernel_size, one_d), _as_2d(stride, one_d)
        self.padding, self.dilation = _as_2d(padding, one_d, 0), _as_2d(dilation, one_d)
        self.ceil_mode = bool(ceil_mode)

    @classmethod
    def from_module(cls, name, m):
        return cls(name, m, isinstance(m, nn.MaxPool1d), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)

    def forward(self, x, ctx):
        xx = x.unsqueeze(2) if self.one_d else x
        y, idx = F.max_pool2d(xx, self.kernel, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode,
                              return_indices=True)
        y = y.squeeze(2) if self.one_d else y
        return y, (idx.flatten(2), x.shape, y.shape)

    def linear(self, q, saved, K):
        idx, _, out_shape = saved
        qs = per_copy(q.flatten(2), idx.shape[0])
        return qs.gather(3, idx.expand(qs.shape[0], *idx.shape)).reshape(_rows(out_shape, q.shape[0]))

    def transpose(self, c, saved, K):
        idx, in_shape, _ = saved
        cs = per_copy(c.flatten(2), idx.shape[0])
        out = cs.new_zeros(*cs.shape[:3], math.prod(in_shape[2:]))
        out.scatter_add_(3, idx.expand(cs.shape[0], *idx.shape), cs)
        return out.reshape(_rows(in_shape, c.shape[0]))

    def descriptor(self):
        return ("maxpool", dict(one_d=[int(self.one_d)], kernel=self.kernel, stride=self.stride, padding=self.padding,
                                dilation=self.dilation, ceil_mode=[int(self.ceil_mode)]))


class AvgPool(Unary):
    """Average pool; ``Rᵀ`` is ``aten.avg_pool2d_backward`` (1-d pools run as 2-d with height 1)."""

    kind = "avgpool"
    chain_kinds = ("avgpool",)
    modules = (nn.AvgPool1d, nn.AvgPool2d)
    functions = {F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d}

    def __init__(self, name, module, one_d: bool, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__(name, module)
        self.one_d = one_d
        stride = kernel_size if stride is None or stride == [] else stride
        self.kernel, self.stride = _as_2d(kernel_size, one_d), _as_2d(stride, one_d)
        self.padding = _as_2d(padding, one_d, 0)
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        self.divisor = divisor_override

    @classmethod
    def from_module(cls, name, m):
        one_d = isinstance(m, nn.AvgPool1d)
        return cls(name, m, one_d, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                   None if one_d else m.divisor_override)

    def _as2d(self, t: Tensor) -> Tensor:
        return t.unsqueeze(2) if self.one_d else t

    def forward(self, x, ctx):
        return self.linear(x, x.shape, None), x.shape

    def linear(self, q, saved, K):
        y = F.avg_pool2d(self._as2d(q), self.kernel, self.stride, self.padding, self.ceil_mode,
                         self.count_include_pad, self.divisor)
        return y.squeeze(2) if self.one_d else y

    def transpose(self, c, saved, K):
        shape_only = self._as2d(c.new_empty(1).expand(_rows(saved, c.shape[0])))
        g = torch.ops.aten.avg_pool2d_backward(self._as2d(c), shape_only, self.kernel, self.stride, self.padding,
                                               self.ceil_mode, self.count_include_pad, self.divisor)
        return g.squeeze(2) if self.one_d else g

    def descriptor(self):
        return ("avgpool", dict(one_d=[int(self.one_d)], kernel=self.kernel, stride=self.stride, padding=self.padding,
                                ceil_mode=[int(self.ceil_mode)], count_include_pad=[int(self.count_include_pad)],
                                divisor=[] if self.divisor is None else [self.divisor]))


class AdaptiveAvgPool(Unary):
    """Adaptive average pool (global pooling included); ``Rᵀ`` is ``aten._adaptive_avg_pool2d_backward``."""

    kind = "adaptive-avgpool"
    modules = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    functions = {F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d}

    @classmethod
    def from_module(cls, name, m):
        return cls(name, m, isinstance(m, nn.AdaptiveAvgPool1d), m.output_size)

    def __init__(self, name, module, one_d: bool, output_size):
        super().__init__(name, module)
        self.one_d = one_d
        self.output_size = [1, output_size if isinstance(output_size, int) else output_size[0]] if one_d else \
            list(output_size) if isinstance(output_size, (tuple, list)) else [output_size, output_size]

    def forward(self, x, ctx):
        size = [s if s is not None else x.shape[2 + i - int(self.one_d)] for i, s in enumerate(self.output_size)]
        return self._apply(x, size), (x.shape, size)

    def _apply(self, q, size):
        y = F.adaptive_avg_pool2d(q.unsqueeze(2) if self.one_d else q, size)
        return y.squeeze(2) if self.one_d else y

    def linear(self, q, saved, K):
        return self._apply(q, saved[1])

    def transpose(self, c, saved, K):
        in_shape = _rows(saved[0], c.shape[0])
        c2 = c.unsqueeze(2) if self.one_d else c
        if self.one_d:
            in_shape.insert(2, 1)
        g = torch.ops.aten._adaptive_avg_pool2d_backward(c2.contiguous(), c2.new_empty(1).expand(in_shape))
        return g.squeeze(2) if self.one_d else g


class Mean(Unary):
    """``x.mean(dims, keepdim)`` over non-batch dimensions (global average pooling written as a mean)."""

    kind = "mean"

    def __init__(self, name, dims: List[int], keepdim: bool):
        super().__init__(name)
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x, ctx):
        dims = [d % x.dim() for d in self.dims]
        if 0 in dims:
            raise UnsupportedOp(f"{self.name} averages over the batch dimension")
        return x.mean(dims, keepdim=self.keepdim), (x.shape, dims)

    def linear(self, q, saved, K):
        return q.mean(saved[1], keepdim=self.keepdim)

    def transpose(self, c, saved, K):
        in_shape, dims = saved
        if not self.keepdim:
            for d in sorted(dims):
                c = c.unsqueeze(d)
        return (c / math.prod(in_shape[d] for d in dims)).expand(_rows(in_shape, c.shape[0]))


class Add(Op):
    """``y = y_1 + y_2`` (residual sums; broadcasting over non-batch dimensions allowed): ``A q = Σ q_m``,
    ``Aᵀ c = (c summed to the shape of each input)``."""

    kind = "add"

    def run(self, xs, ctx):
        per_sample = ctx.input_per_sample(xs)
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        if any(p and x.dim() != y.dim() for x, p in zip(xs, per_sample)):
            raise UnsupportedOp(f"{self.name} adds tensors of shapes {[tuple(x.shape) for x in xs]}")
        return y, ([x.shape for x in xs], per_sample, y.shape)

    def tangent(self, qs, saved, K):
        terms = [q for q in qs if q is not None]
        y = terms[0]
        for q in terms[1:]:
            y = y + q
        return y.expand(_rows(saved[2], y.shape[0]))  # a constant operand may broadcast the others

    def cotangent(self, c, saved, K):
        shapes, per_sample, _ = saved
        return [reduce_to(c, shape, p) for shape, p in zip(shapes, per_sample)]


class Cat(Op):
    """Concatenation along a non-batch dimension: ``A q = cat(q_m)``, ``Aᵀ c = split(c)``."""

    kind = "cat"

    def __init__(self, name, dim: int):
        super().__init__(name)
        self.dim = dim

    def run(self, xs, ctx):
        dim = self.dim % xs[0].dim()
        if dim == 0:
            raise UnsupportedOp(f"{self.name} concatenates along the batch dimension")
        return torch.cat(xs, dim), (dim, [x.shape[dim] for x in xs], [x.shape for x in xs])

    def tangent(self, qs, saved, K):
        dim, sizes, shapes = saved
        rows = next(q.shape[0] for q in qs if q is not None)
        return torch.cat([q if q is not None else qs_zero(rows, s, qs) for q, s in zip(qs, shapes)], dim)

    def cotangent(self, c, saved, K):
        dim, sizes, _ = saved
        return list(c.split(sizes, dim))


def qs_zero(rows: int, shape, like: List[Optional[Tensor]]) -> Tensor:
    t = next(q for q in like if q is not None)
    return t.new_zeros(_rows(shape, rows))


# ------------------------------------------------------------ routing: permutations, selections, drop paths
def split_item(x: Tensor, item: int, how: str, *args: Any, permute: Optional[Sequence[int]] = None,
               **kwargs: Any) -> Tensor:
    """``getattr(x, how)(*args, **kwargs)[item]``: one tensor of a ``chunk`` / ``split`` / ``unbind`` /
    ``tensor_split`` result. The front-end rewrites ``x.chunk(2, 1)[i]`` into this call, so that each item is a
    node with one tensor value (a :class:`Route`). With ``permute``, ``x`` is permuted first: the attention
    heads' ``qkv.permute(2, 0, 3, 1, 4).unbind(0)`` moves the batch away from dimension 0 and back, which is a
    route of each sample's entries only as one call."""
    if permute is not None:
        x = x.permute(*permute)
    return getattr(x, how)(*args, **kwargs)[item]


class Route(Unary):
    """A fixed permutation or selection of each sample's entries (docs/maths.md §4.12): ``permute``,
    ``transpose``, ``.T`` / ``.mT``, ``movedim``, ``flip``, ``roll``, ``diagonal``, ``narrow``, ``select``, indexing
    by integers, slices, ``None`` and ``Ellipsis``, an item of ``chunk`` / ``split`` / ``unbind`` (:func:`split_item`).

    ``fn(tensors, values)`` is the traced call on ``[x]``. Each forward pass also runs it on the entries'
    indices: this gives the map as a gather, ``y[b].flat[j] = x[b].flat[π(j)]``, and proves that every output
    row reads its own sample only, through the same ``π`` (a call that routes across the batch, e.g. indexing
    dimension 0, is refused, so the ``k·B`` stacked class copies are exact). ``A q`` gathers through ``π``;
    ``Aᵀ ξ`` gathers through ``π⁻¹``, reading a zero where no output reads the entry. No θ, source 0."""

    kind = "route"

    def __init__(self, name: str, fn: Callable[[Sequence[Tensor], Mapping], Tensor]) -> None:
        super().__init__(name)
        self.fn = fn

    def forward(self, x, ctx):
        y = self.fn([x], ctx.values)
        B, n_in = x.shape[0], math.prod(x.shape[1:])
        ids = self.fn([torch.arange(x.numel(), device=x.device).view(x.shape)], ctx.values)
        if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != B or ids.shape != y.shape:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise UnsupportedOp(f"{self.name} routes across the batch dimension ({tuple(x.shape)} -> {shape}); "
                                "dbprop needs every tensor to keep the batch first")
        rel = ids.reshape(B, -1) - torch.arange(B, device=x.device).unsqueeze(1) * n_in
        pi = rel[0]
        if B and (bool(((rel < 0) | (rel >= n_in)).any()) or not bool((rel == pi).all())):
            raise UnsupportedOp(f"{self.name} mixes the entries of different samples ({tuple(x.shape)} -> "
                                f"{tuple(y.shape)}); dbprop needs each sample's values to stay in its own row")
        positions = torch.arange(pi.numel(), device=x.device)
        inverse = pi.new_full((n_in,), pi.numel())  # π⁻¹, pointing at an appended zero where nothing reads
        inverse[pi] = positions
        if not bool((inverse[pi] == positions).all()):
            raise UnsupportedOp(f"{self.name} reads some entries twice; only permutations and selections are routes")
        return y, (pi, inverse, x.shape, y.shape)

    def linear(self, q, saved, K):
        pi, _, _, out_shape = saved
        return q.reshape(q.shape[0], -1).index_select(1, pi).view(_rows(out_shape, q.shape[0]))

    def transpose(self, c, saved, K):
        _, inverse, in_shape, _ = saved
        return F.pad(c.reshape(c.shape[0], -1), (0, 1)).index_select(1, inverse).view(_rows(in_shape, c.shape[0]))


class AdaptiveMaxPool(MaxPool):
    """Adaptive max-pool (1-d as 2-d of height 1): routing through the forward's argmax, as :class:`MaxPool`
    (docs/maths.md §4.5)."""

    kind = "adaptive-maxpool"
    chain_kinds = ()
    modules = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    functions = {F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d, F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d}

    def __init__(self, name, module, one_d: bool, output_size):
        Unary.__init__(self, name, module)
        self.one_d = one_d
        size = list(output_size) if isinstance(output_size, (tuple, list)) else [output_size]
        self.output_size = [1, size[0]] if one_d else (size if len(size) == 2 else size * 2)

    @classmethod
    def from_module(cls, name, m):
        return cls(name, m, isinstance(m, nn.AdaptiveMaxPool1d), m.output_size)

    def forward(self, x, ctx):
        xx = x.unsqueeze(2) if self.one_d else x
        size = [s if s is not None else xx.shape[2 + i] for i, s in enumerate(self.output_size)]
        y, idx = F.adaptive_max_pool2d(xx, size, return_indices=True)
        y = y.squeeze(2) if self.one_d else y
        return y, (idx.flatten(2), x.shape, y.shape)

    def descriptor(self):
        return None


class DropPath(Dropout):
    """Stochastic depth: torchvision's ``StochasticDepth(p, mode)`` and timm's ``DropPath(drop_prob,
    scale_by_keep)``, matched by class name and module path (``module_names``) so that neither is imported.
    Eval mode or ``p = 0``: the identity. Train mode: as :class:`Dropout` (docs/maths.md §4.6), the mask drawn
    once in the forward pass exactly as the module draws it (one Bernoulli(1 − p) per sample, or one per batch
    in torchvision's ``mode="batch"``, divided by 1 − p) and reused by every other pass."""

    kind = "drop-path"
    chain_kinds = ("identity",)  # eval mode
    modules = ()
    module_names = (("torchvision.ops", "StochasticDepth"), ("timm.layers", "DropPath"),
                    ("timm.models.layers", "DropPath"))

    @classmethod
    def covers(cls, m: nn.Module) -> bool:
        t = type(m)
        return any(t.__name__ == name and t.__module__.startswith(prefix) for prefix, name in cls.module_names)

    def _rule(self) -> Tuple[float, bool, bool]:
        """``(p, one draw per sample?, divide by 1 − p?)`` from the live module."""
        m = self.module
        if hasattr(m, "drop_prob"):  # timm
            return float(m.drop_prob), True, bool(m.scale_by_keep)
        if m.mode not in ("row", "batch") or not 0.0 <= m.p <= 1.0:
            raise ValueError(f"{self.name}: StochasticDepth needs 0 <= p <= 1 and mode 'row' or 'batch', got "
                             f"p={m.p}, mode={m.mode!r}")
        return float(m.p), m.mode == "row", True

    def _active(self) -> bool:
        return self.module.training and self._rule()[0] != 0.0

    def forward(self, x, ctx):
        if not self._active():
            return x, None
        p, rows, scale = self._rule()
        mask = torch.empty([x.shape[0] if rows else 1] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(1.0 - p)
        if p < 1.0 and scale:
            mask.div_(1.0 - p)
        return x * mask, mask

    def descriptor(self):
        return None if self._active() else ("identity", {})


def node_kinds() -> List[type]:
    """Every node kind (subclass of :class:`Op`), parents before children."""
    kinds, todo = [], [Op]
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        kinds.append(cls)
    return kinds


def chain_kinds() -> Tuple[str, ...]:
    """The Python side of the native chain driver's kind table: every name some node's ``descriptor()`` returns
    (checked on import against ``_C.chain_kinds()``, csrc/program.h)."""
    return tuple(dict.fromkeys(k for cls in node_kinds() for k in cls.chain_kinds))


class UnsupportedOp(RuntimeError):
    """A traced call that the program cannot represent (raised at the first forward pass)."""


# --------------------------------------------------------------------------------------------- opaque
class Opaque(Op):
    """Any other module or function: its four operators come from local autograd at the saved inputs,
    reverse-over-reverse (docs/maths.md §4.10). Exact, not fused: each class copy is one local autograd call.
    ``fn(tensors, values)`` is the traced call on its inputs (``values`` as in :class:`RunContext`)."""

    kind = "opaque"
    native = False
    has_source = True

    def __init__(self, name: str, fn: Callable[[Sequence[Tensor], Mapping], Tensor],
                 module: Optional[nn.Module] = None) -> None:
        super().__init__(name, module)
        self.fn = fn

    def params(self):
        return [] if self.module is None else [p for p in self.module.parameters()]

    def run(self, xs, ctx):
        with torch.enable_grad():  # integer and boolean inputs (a mask computed from x) carry no derivative
            xr = [x.detach().requires_grad_(x.is_floating_point() or x.is_complex()) for x in xs]
            y = self.fn(xr, ctx.values)
        if not isinstance(y, Tensor):
            raise UnsupportedOp(f"{self.name} returns {type(y).__name__}, not a tensor")
        return y.detach(), (xr, y)

    @staticmethod
    def _grad(outputs, inputs, grad_outputs, create_graph=False) -> List[Optional[Tensor]]:
        wanted = [t for t in inputs if t.requires_grad]
        if not wanted or not outputs.requires_grad:  # (an integer or boolean output: no derivative)
            return [None] * len(inputs)
        got = iter(torch.autograd.grad(outputs, wanted, grad_outputs, retain_graph=True, create_graph=create_graph,
                                       allow_unused=True))
        return [next(got) if t.requires_grad else None for t in inputs]

    def _copies(self, t: Optional[Tensor], batch: int, k: int) -> List[Optional[Tensor]]:
        return [None] * k if t is None else list(per_copy(t, batch).unbind(0))

    def backward_step(self, c, saved, K):
        xr, y = saved
        B = y.shape[0]
        per = [self._grad(y, xr, ci) for ci in per_copy(c, B)]
        return [_stack_rows([p[m] for p in per], xr[m]) for m in range(len(xr))]

    def bbp_step(self, xi, qs, saved, want, need_tangent, K):
        xr, y = saved
        B, params = y.shape[0], self.params()
        k = next(q.shape[0] for q in qs if q is not None) // B
        q_copies = [self._copies(q, B, k) for q in qs]
        xi_copies = self._copies(xi, B, k)
        tangents, mixed, sources = [], [None] * len(params), [None] * len(xr)
        if not y.requires_grad:  # an integer or boolean output (a mask): no tangent, no second-order terms
            return (torch.zeros_like(y).repeat(k, *[1] * (y.dim() - 1)) if need_tangent else None), mixed, sources
        for i in range(k):
            with torch.enable_grad():
                v = (xi_copies[i] if xi_copies[i] is not None else torch.zeros_like(y)).detach().requires_grad_(True)
                u = self._grad(y, xr, v, create_graph=True)               # u = Aᵀ v at (y, θ), differentiable
                s = sum((ui * qc[i]).sum() for ui, qc in zip(u, q_copies) if ui is not None and qc[i] is not None)
                if not isinstance(s, Tensor) or not s.requires_grad:
                    tangents.append(torch.zeros_like(y))
                    continue
                targets = [v] + (list(xr) if xi is not None else []) + \
                    ([p for p, w in zip(params, want) if w] if xi is not None else [])
                got = torch.autograd.grad(s, targets, retain_graph=True, allow_unused=True)
            tangents.append(got[0] if got[0] is not None else torch.zeros_like(y))
            if xi is not None:
                for m, g in enumerate(got[1:1 + len(xr)]):
                    if g is not None:
                        sources[m] = g if sources[m] is None else sources[m] + g
                it = iter(got[1 + len(xr):])
                for j, w in enumerate(want):
                    if w:
                        g = next(it)
                        if g is not None:
                            mixed[j] = g if mixed[j] is None else mixed[j] + g
        q = torch.cat(tangents, 0) if need_tangent else None
        return q, mixed, sources

    def fbp_step(self, eta, saved, want_inputs, want, K):
        xr, y = saved
        params = self.params()
        targets = (list(xr) if want_inputs else []) + [p for p, w in zip(params, want) if w]
        got = self._grad(y, targets, eta) if targets else []
        ins = [g if g is not None else torch.zeros_like(x) for g, x in zip(got[:len(xr)], xr)] if want_inputs else None
        it = iter(got[len(xr) if want_inputs else 0:])
        return ins, [next(it) if w else None for w in want]


def _stack_rows(parts: List[Optional[Tensor]], like: Tensor) -> Tensor:
    return torch.cat([p if p is not None else torch.zeros_like(like) for p in parts], 0)


# ------------------------------------------------------------------------ parameters, products, constants
def reduce_to(g: Tensor, shape: Sequence[int], per_sample: bool) -> Tensor:
    """``g`` (a cotangent or source of a broadcasting node's output) summed to the shape of one input.

    A ``per_sample`` input (one that depends on ``x``) keeps the rows of ``g`` (``g`` may carry ``k·B`` rows)
    and only the dimensions it broadcasts are summed. Any other input is a constant of the program (a parameter
    leaf, docs/maths.md §4.14): ``g`` is summed to exactly its shape."""
    if per_sample:
        dims = [d for d in range(1, g.dim()) if shape[d] == 1 and g.shape[d] != 1]
        return g.sum(dims, keepdim=True) if dims else g
    return g.sum_to_size(tuple(shape))


def _times(c: Tensor, v: Tensor, per_sample: bool, batch: int) -> Tensor:
    """``c ⊙ v`` with ``c`` of ``k·batch`` rows and ``v`` per-sample (``batch`` rows) or a constant that
    broadcasts from the trailing dimensions."""
    return (per_copy(c, batch) * v).flatten(0, 1) if per_sample else c * v


class FunctionalWeights:
    """The parameters of ``F.linear(h, self.W, self.b)`` read in the forward, standing in for the module a
    :class:`Linear` node reads (live, like a module's)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        self.weight, self.bias = weight, bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


class ParameterLeaf(Op):
    """A parameter read directly in the forward (an fx ``get_attr``): a leaf of the program with no input
    (docs/maths.md §4.14). It does not depend on ``x``, so its tangent is 0 and no cotangent of the backward
    pass reaches it; what reaches it is the source ``ŝ`` of its consumers in the backward-backward pass and
    ``η`` in the forward-backward pass, and both are its gradient: ``B = I``, ``∇θ = ŝ + η``."""

    kind = "parameter"

    def __init__(self, name: str, tensor: Tensor) -> None:
        super().__init__(name)
        self.tensor = tensor

    def params(self):
        return [self.tensor] if isinstance(self.tensor, nn.Parameter) else []

    def run(self, xs, ctx):
        return self.tensor.detach(), None

    def tangent(self, qs, saved, K):
        raise RuntimeError(f"{self.name}: a parameter leaf has no tangent")

    def cotangent(self, c, saved, K):
        return []

    def param_grads(self, eta, saved, want, K):
        return [eta.sum_to_size(self.tensor.shape) if want and want[0] else None][:len(want)]


class ParameterFunction(Opaque):
    """A traced call whose tensor inputs are all parameter leaves or other parameter functions (``cls.expand(B,
    -1, -1)``, ``W.t()``, ``gamma.view(1, -1, 1, 1)``): it does not depend on ``x``, so the passes only ever
    ask for its VJP in the forward-backward pass (``η`` to its inputs), which local autograd gives exactly, once
    per penalty, on parameter-sized tensors. Never on the path of ``x``, it runs no per-class work: native."""

    kind = "parameter-function"
    native = True
    has_source = False


class Product(Op):
    """``y = a ⊙ b`` of two nodes, broadcasting (docs/maths.md §4.15): squeeze-excitation ``x * s``, gating
    ``a * silu(b)``, a parameter leaf ``x * γ``. ``A(q_a, q_b) = q_a ⊙ b + a ⊙ q_b``, ``Aᵀ c = (c ⊙ b, c ⊙ a)``
    and the source ``(Σ_copies ξ ⊙ q_b, Σ_copies ξ ⊙ q_a)``, each reduced to its input's shape. ``A`` depends
    on the forward point (through ``a`` and ``b``), hence the source; for a parameter leaf it is the mixed
    term θ̂. ``saved`` is ``(a, b, per-sample flags, batch)``."""

    kind = "product"
    has_source = True

    def run(self, xs, ctx):
        a, b = xs
        per_sample = ctx.input_per_sample(xs)
        y = a * b
        if any(p and t.dim() != y.dim() for t, p in zip(xs, per_sample)):
            raise UnsupportedOp(f"{self.name} multiplies tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        return y, (a, b, per_sample, ctx.batch)

    def tangent(self, qs, saved, K):
        a, b, (pa, pb), batch = saved
        y = None
        if qs[0] is not None:
            y = _times(qs[0], b, pb, batch)
        if qs[1] is not None:
            t = _times(qs[1], a, pa, batch)
            y = t if y is None else y + t
        return y

    def cotangent(self, c, saved, K):
        a, b, (pa, pb), batch = saved
        return [reduce_to(_times(c, b, pb, batch), a.shape, pa), reduce_to(_times(c, a, pa, batch), b.shape, pb)]

    def source(self, xi, qs, saved, K):
        a, b, (pa, pb), batch = saved

        def term(q: Optional[Tensor], shape, per_sample: bool) -> Optional[Tensor]:
            """``Σ_copies ξ ⊙ q`` (``B`` rows), reduced to the input's shape."""
            return None if q is None else reduce_to((per_copy(xi, batch) * per_copy(q, batch)).sum(0), shape,
                                                    per_sample)

        return [term(qs[1], a.shape, pa), term(qs[0], b.shape, pb)]


class Difference(Op):
    """``y = a − b`` of two nodes, broadcasting: ``A(q_a, q_b) = q_a − q_b``, ``Aᵀ c = (c, −c)`` reduced to each
    input's shape. No θ, source 0."""

    kind = "difference"

    def run(self, xs, ctx):
        return xs[0] - xs[1], (xs[0].shape, xs[1].shape, ctx.input_per_sample(xs))

    def tangent(self, qs, saved, K):
        qa, qb = qs
        return qa if qb is None else -qb if qa is None else qa - qb

    def cotangent(self, c, saved, K):
        sa, sb, (pa, pb) = saved
        return [reduce_to(c, sa, pa), reduce_to(-c, sb, pb)]


class ConstantAffine(Unary):
    """An elementwise affine map of one node by a constant ``c`` (a number, a buffer, any value that depends
    neither on ``x`` nor on a parameter): ``x * c``, ``c * x``, ``x / c``, ``x + c``,
    ``x − c``, ``c − x``, ``−x`` (docs/maths.md §4.15). The forward is the traced call itself (bit for bit);
    ``A q = ±q``, ``q ⊙ c`` or ``q / c`` (broadcast to the output), ``Aᵀ`` the same reduced to the input's shape.
    No θ, source 0. ``how`` is ``"mul"``, ``"div"`` or ``"shift"`` with ``sign`` ±1; ``factor(values)`` reads the
    constant of this call from the pass's traced values. ``saved`` is ``(c or None, x.shape, y.shape)``."""

    kind = "constant-affine"

    def __init__(self, name: str, call: Callable, how: str, sign: float = 1.0,
                 factor: Optional[Callable[[Mapping], Any]] = None) -> None:
        super().__init__(name)
        if how not in ("mul", "div", "shift"):
            raise ValueError(f"ConstantAffine: how must be 'mul', 'div' or 'shift', got {how!r}")
        self.call, self.how, self.sign, self.factor = call, how, sign, factor

    def forward(self, x, ctx):
        y = self.call([x], ctx.values)
        c = self.factor(ctx.values) if self.how != "shift" else None
        if isinstance(c, Tensor) and (c.dim() > x.dim() or c.dim() == x.dim() and c.shape[0] != 1):
            raise UnsupportedOp(f"{self.name} broadcasts x of shape {tuple(x.shape)} with a constant of shape "
                                f"{tuple(c.shape)} along the batch dimension")
        return y, (c, x.shape, y.shape)

    def _apply(self, q: Tensor, c) -> Tensor:
        if self.how == "mul":
            return q * c
        if self.how == "div":
            return q / c
        return q if self.sign > 0 else -q

    def linear(self, q, saved, K):
        c, _, y_shape = saved
        return self._apply(q, c).expand(_rows(y_shape, q.shape[0]))

    def transpose(self, c_out, saved, K):
        c = saved[0]
        return reduce_to(self._apply(c_out, c), saved[1], True)


# ------------------------------------------------------------------------------------------------ attention
#: ``F.scaled_dot_product_attention``'s parameters, in order (its signature is not introspectable)
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _t(a: Tensor) -> Tensor:
    return a.transpose(-1, -2)


def _rowsum(a: Tensor) -> Tensor:
    return a.sum(-1, keepdim=True)


class Attention(Op):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, 0, is_causal, scale)`` of three nodes
    (docs/maths.md §4.17): per sample and head ``S = s·QKᵀ + M``, ``P = softmax_rows(S)``, ``O = PV``, with
    ``q``, ``k``, ``v`` of shapes ``(B, H, L, E)``, ``(B, H, S, E)``, ``(B, H, S, Ev)`` (or without the head
    dimension; any leading dimensions after the batch). The mask ``M`` is a constant of the program (a buffer,
    a tensor built from sizes): boolean (``−∞`` where False) or additive; a row masked everywhere gives 0, as
    torch's math backend does. The operators are (4.22)–(4.26); there is no θ, and the sources
    ``∂_{Q,K,V}⟨ξ, A q⟩`` are not zero. This is the readable reference: it stores ``P`` (``B·H·L·S`` entries);
    the forward value is the traced call itself, bit for bit. ``options(values)`` gives the call's
    ``(attn_mask, dropout_p, is_causal, scale, enable_gqa)`` from the pass's traced values. ``saved`` is
    ``(Q, K, V, P, O, s, per-sample flags, batch)``."""

    kind = "attention"
    has_source = True
    functions: Dict[Callable, type] = {}  # lowered by dbprop/program.py (_Lowering._attention): three node inputs

    def __init__(self, name: str, call: Callable[[Sequence[Tensor], Mapping], Tensor],
                 options: Callable[[Mapping], Tuple[Any, Any, Any, Any, Any]]) -> None:
        super().__init__(name)
        self.call, self.options = call, options

    def run(self, xs, ctx):
        q, k, v = xs
        mask, dropout_p, is_causal, scale, gqa = self.options(ctx.values)
        if not (isinstance(dropout_p, (int, float)) and dropout_p == 0):
            raise UnsupportedOp(f"{self.name}: scaled_dot_product_attention with dropout_p={dropout_p}; dbprop needs "
                                "dropout_p=0 (pass dropout_p=0.0 in eval mode or use an attention without dropout)")
        per_sample = ctx.input_per_sample(xs)
        rows = {t.shape[0] for t, p in zip(xs, per_sample) if p}
        if not (q.dim() == k.dim() == v.dim() >= 3) or len({t.shape[1:-2] for t in xs}) != 1 or \
                k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1] or rows != {ctx.batch} or \
                any(not p and t.shape[0] not in (1, ctx.batch) for t, p in zip(xs, per_sample)):
            # a parameter leaf (a learned query) may have batch size 1 and broadcast
            raise UnsupportedOp(f"{self.name}: scaled_dot_product_attention of q, k, v of shapes {tuple(q.shape)}, "
                                f"{tuple(k.shape)}, {tuple(v.shape)}; dbprop needs (B, [H,] L, E), (B, [H,] S, E), "
                                "(B, [H,] S, Ev) with equal batch and head dimensions" +
                                (" (grouped-query attention with fewer key/value heads is not supported)"
                                 if gqa else ""))
        y = self.call(xs, ctx.values)
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        S = (q @ _t(k)) * s
        L, Sk = q.shape[-2], k.shape[-2]
        if is_causal:
            mask = torch.ones(L, Sk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:  # only the forward reads it: P keeps its B rows (a per-sample mask is fine)
            S = S.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else S + mask
        P = torch.softmax(S, -1)
        P = torch.where(S.amax(-1, keepdim=True) == -math.inf, torch.zeros((), dtype=P.dtype, device=P.device), P)
        return y, (q, k, v, P, y, s, per_sample, ctx.batch)

    @staticmethod
    def _copies(t: Optional[Tensor], batch: int) -> Optional[Tensor]:
        return None if t is None else per_copy(t, batch)

    @staticmethod
    def _score_tangent(qd, kd, Q, K, s) -> Optional[Tensor]:
        """``Ṡ = s(q̇Kᵀ + Qk̇ᵀ)`` per copy, ``None`` where both tangents are 0."""
        Sd = None
        if qd is not None:
            Sd = qd @ _t(K)
        if kd is not None:
            t = Q @ _t(kd)
            Sd = t if Sd is None else Sd + t
        return None if Sd is None else Sd * s

    @staticmethod
    def _out(g: Optional[Tensor], shape, per_sample: bool, batch: int, copies: bool) -> Optional[Tensor]:
        """A per-copy ``(k, B, ...)`` result as an input's cotangent (``k·B`` rows) or, ``copies=False``, summed
        over the copies (a source, ``B`` rows); reduced to the input's shape (docs/maths.md §4.14)."""
        if g is None:
            return None
        if per_sample:
            g = g.expand(g.shape[0], batch, *shape[1:])
            return g.flatten(0, 1) if copies else g.sum(0)
        return g.sum(0).sum_to_size(tuple(shape))

    def tangent(self, qs, saved, K):  # (4.22)
        Q, Kt, V, P, O, s, _, batch = saved
        qd, kd, vd = (self._copies(t, batch) for t in qs)
        rows = next(t.shape[0] for t in qs if t is not None)
        Sd = self._score_tangent(qd, kd, Q, Kt, s)
        y = None
        if Sd is not None:
            y = (P * (Sd - _rowsum(P * Sd))) @ V
        if vd is not None:
            t = P @ vd
            y = t if y is None else y + t
        return y.expand(rows // batch, batch, *O.shape[1:]).flatten(0, 1)

    def cotangent(self, c, saved, K):  # (4.23)
        Q, Kt, V, P, O, s, per_sample, batch = saved
        xi = per_copy(c, batch)
        G = P * (xi @ _t(V) - _rowsum(xi * O))  # dS = P ⊙ (D − δ), δ = rowsum(ξ ⊙ O)
        grads = [(G @ Kt) * s, (_t(G) @ Q) * s, _t(P) @ xi]
        return [self._out(g, t.shape, p, batch, True) for g, t, p in zip(grads, (Q, Kt, V), per_sample)]

    def source(self, xi, qs, saved, K):  # (4.24)–(4.26), summed over class copies
        Q, Kt, V, P, O, s, per_sample, batch = saved
        qd, kd, vd = (self._copies(t, batch) for t in qs)
        xi = per_copy(xi, batch)
        Dc = xi @ _t(V) - _rowsum(xi * O)        # D − δ
        G = P * Dc
        Sd = self._score_tangent(qd, kd, Q, Kt, s)
        g = sV = None
        if Sd is not None:
            Sc = Sd - _rowsum(P * Sd)            # Ṡ − σ̇
            g = Dc * Sc
            sV = (_t(P * Sc) @ xi).sum(0)        # ŝ_V = Ṗᵀ ξ
        if vd is not None:
            E = xi @ _t(vd)
            g = E if g is None else g + E
        sQ = sK = None
        if g is not None:                        # H enters linearly: summed over the copies first
            H = (P * (g - _rowsum(P * g))).sum(0)
            sQ, sK = H @ Kt, _t(H) @ Q
        if kd is not None:
            t = (G @ kd).sum(0)
            sQ = t if sQ is None else sQ + t
        if qd is not None:
            t = (_t(G) @ qd).sum(0)
            sK = t if sK is None else sK + t
        out = []
        for g, t, p, scale in zip((sQ, sK, sV), (Q, Kt, V), per_sample, (s, s, 1.0)):
            if g is not None:
                g = g * scale if scale != 1.0 else g
                g = g.expand(batch, *t.shape[1:]) if p else g.sum_to_size(tuple(t.shape))
            out.append(g)
        return out
