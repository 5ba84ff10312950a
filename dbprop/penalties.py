"""The penalties of docs/maths.md §5: directions ``v``, ``p(ξ_0)``, ``q_0 = ∇p(ξ_0)`` and the output terms ``ζ_L``, ``η_L``.

A penalty ("head") sees the model output ``o`` (logits, shape ``(B, C)``) and, per direction ``v`` (a
batch of output cotangents, shape ``(k, B, C)``), the per-sample input gradients ``ξ_0 = (dx_L/dx_0)* v``
(shape ``(k, B, ...)``). ``R_b = Σ_k p(ξ_0^{(k)}_b, x_b)`` (plus a loss term for double backprop).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

OUTPUTS = ("logits", "softmax")
REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1; bools and other types are refused (``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        check_positive_int("chunk_size (or None)", chunk_size)


def check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def check_input(x) -> None:
    """The checks every input passes before any pass runs (the native program's and the fallback's alike)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"input must be a dense (strided) tensor, got layout {x.layout}; call .to_dense() first")
    if x.is_meta:
        raise ValueError("input is a meta tensor (no values): dbprop computes values, run it on a real device")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"input must be batched, shape (batch, ...); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: the input has batch size 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input contains non-finite values (inf or nan)")


def _flat_sum(t: Tensor) -> Tensor:
    """Sum over all feature dimensions of a ``(k, B, ...)`` tensor -> ``(k, B)``."""
    return t.flatten(2).sum(-1)


def _bcast(s: Tensor, like: Tensor) -> Tensor:
    """A ``(k, B)`` per-sample scalar shaped to broadcast against ``like`` ``(k, B, ...)``."""
    return s.view(*s.shape, *([1] * (like.dim() - 2)))


def softmax_adjoint(x: Tensor, v: Tensor) -> Tensor:
    """``S v`` with ``S = diag(x) − x xᵀ`` (the symmetric Jacobian of softmax at ``x = softmax(z)``)."""
    return x * v - (x * v).sum(-1, keepdim=True) * x


def softmax_eta(x: Tensor, v: Tensor, h: Tensor) -> Tensor:
    """Thesis (3.15): ``η_L = x⊙v⊙h − ⟨x,v⟩x⊙h − ⟨x,h⟩x⊙v − ⟨x,v⊙h⟩x + 2⟨x,v⟩⟨x,h⟩x`` (``v`` constant)."""
    xv = (x * v).sum(-1, keepdim=True)
    xh = (x * h).sum(-1, keepdim=True)
    xvh = (x * v * h).sum(-1, keepdim=True)
    return x * v * h - xv * x * h - xh * x * v - xvh * x + 2 * xv * xh * x


class Penalty:
    """Base class: the output map ``g_L`` and its terms for a constant direction ``v``."""

    has_loss = False
    reads_x = False  # p depends on x directly (then input_grad is not None)

    def __init__(self, output: str = "logits") -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        self.probs: Optional[Tensor] = None
        self.ready = False

    # ---- set-up from the forward pass
    def setup(self, o: Tensor, x: Tensor, jacobian) -> None:
        """Read the output ``o`` (detached, ``(B, C)``); ``jacobian`` offers ``vjp``/``jvp`` for power iterations."""
        if o.dim() != 2:
            raise ValueError(f"the model output must have shape (batch, classes); got {tuple(o.shape)}")
        self.num_classes = o.shape[1]
        if self.output == "softmax":
            self.probs = torch.softmax(o, dim=-1)
        self.ready = True

    # ---- directions
    num_directions = 1

    def directions(self, start: int, stop: int) -> Tensor:
        """The cotangents ``v`` of directions ``start..stop-1``, shape ``(k, B, C)``."""
        raise NotImplementedError

    # ---- output layer (§2, §3)
    @property
    def has_eta(self) -> bool:
        """``η_L ≠ 0``: only for softmax outputs (or output-dependent ``v``)."""
        return self.output == "softmax"

    def output_map(self, o: Tensor) -> Tensor:
        return torch.softmax(o, dim=-1) if self.output == "softmax" else o

    def output_cotangent(self, v: Tensor) -> Tensor:
        """``ζ_L = (dx_L/dz_L)* v``: ``v`` (logits) or ``S v`` (softmax)."""
        return softmax_adjoint(self.probs, v) if self.output == "softmax" else v

    output_tangent = output_cotangent  # S is symmetric: the JVP of the output map is the same product

    def output_eta(self, v: Tensor, h: Tensor) -> Tensor:
        """``Σ_k η_L^{(k)}`` for this chunk of directions (softmax; (3.15))."""
        return softmax_eta(self.probs, v, h).sum(0)

    def output_functional(self, o: Tensor, v: Tensor) -> Tensor:
        """A per-sample scalar whose input gradient is ``ξ_0`` (autograd fallback): ``⟨x_L, v⟩``."""
        return (self.output_map(o) * v).sum(-1)

    # ---- p, ∇p and the direct x-dependence of p
    def value(self, xi: Tensor, x: Tensor) -> Tensor:
        """``p(ξ_0)`` per direction and sample, ``(k, B)``; a differentiable torch expression."""
        raise NotImplementedError

    def q0(self, xi: Tensor, x: Tensor) -> Tensor:
        """``q_0 = ∇_ξ p(ξ_0)``, shape of ``xi``."""
        raise NotImplementedError

    def input_grad(self, xi: Tensor, x: Tensor) -> Optional[Tensor]:
        """``∂p/∂x`` at fixed ``ξ_0`` (``None`` when ``p`` does not depend on ``x`` directly)."""
        return None

    # ---- the same head in the native kernels: ``native_name`` is its row of DBPROP_PENALTY_HEADS in
    # csrc/kernels/elementwise.h (checked on import against this class's ``reads_x``: see ``native_heads``),
    # ``native_head`` the call ``(name, p1, p2)``; None: no native head
    native_name: Optional[str] = None

    @property
    def native_head(self):
        return None

    # ---- a loss term ℓ(x_L) added to the penalty (double backprop only)
    def loss_value(self, o: Tensor) -> Tensor:
        raise NotImplementedError


def _check_labels(y, batch: int, num_classes: int, name: str = "labels") -> Tensor:
    if isinstance(y, bool):
        raise TypeError(f"{name} must be an int or an integer tensor of shape (batch,), got a bool")
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.long)
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor of shape (batch,), got {type(y).__name__}")
    if y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.layout != torch.strided or y.is_meta:
        raise TypeError(f"{name} must be a dense tensor with values, got layout {y.layout} on {y.device}")
    y = y.long()  # any integer dtype (uint8, int32, ...): one_hot and gather want int64
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} out of range: values must lie in [0, {num_classes}), "
                         f"got min {int(y.min())}, max {int(y.max())}")
    return y


def _one_hot(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    return F.one_hot(y.to(like.device), num_classes).to(like.dtype)


class SquaredNorm(Penalty):
    """``p = s‖ξ_0‖²`` (``q_0 = 2sξ_0``)."""

    scale = 1.0

    native_name = "squared_norm"

    @property
    def native_head(self):
        return (self.native_name, self.scale, 0.0)

    def value(self, xi, x):
        return self.scale * _flat_sum(xi * xi)

    def q0(self, xi, x):
        return (2.0 * self.scale) * xi


class JacobianFrobenius(SquaredNorm):
    """``‖J‖²_F = Σ_i ‖∇x x_L^i‖²`` exactly (``v = e_i``), or estimated by random projections
    ``v = C^{1/2} u``, ``u`` uniform on the unit sphere, averaged over ``num_projections`` draws."""

    def __init__(self, output="logits", estimator="exact", num_projections=1):
        super().__init__(output)
        if estimator not in ("exact", "random"):
            raise ValueError(f"estimator must be 'exact' or 'random', got {estimator!r}")
        check_positive_int("num_projections", num_projections)
        self.estimator = estimator
        self.num_projections = num_projections

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        self.batch, C = o.shape
        if self.estimator == "exact":
            self.num_directions = C
            self.eye = torch.eye(C, dtype=o.dtype, device=o.device)
        else:
            self.num_directions = self.num_projections
            self.scale = 1.0 / self.num_projections
            u = torch.randn(self.num_projections, self.batch, C, dtype=o.dtype, device=o.device)
            self.v = math.sqrt(C) * u / u.norm(dim=-1, keepdim=True)

    def directions(self, start, stop):
        if self.estimator == "random":
            return self.v[start:stop]
        return self.eye[start:stop, None, :].expand(-1, self.batch, -1)


class OutputGradient(SquaredNorm):
    """``‖∇x x_L^i‖²`` for one output index per sample."""

    def __init__(self, output="logits", index: Union[int, Tensor] = 0):
        super().__init__(output)
        self.index = index

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        self.v = _one_hot(_check_labels(self.index, o.shape[0], o.shape[1], "index"), o.shape[1], o)[None]

    def directions(self, start, stop):
        return self.v


class SpectralNorm(Penalty):
    """``‖Jᵀ v‖`` with ``v`` from ``k`` power iterations on ``J Jᵀ`` (held constant): a lower bound on ‖J‖₂."""

    def __init__(self, output="logits", power_iterations=1):
        super().__init__(output)
        check_positive_int("power_iterations", power_iterations)
        self.power_iterations = power_iterations

    native_name = "spectral"
    native_head = (native_name, 0.0, 0.0)

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        v = torch.randn_like(o)
        for _ in range(self.power_iterations):
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
            v = jacobian.jvp(jacobian.vjp(v))
        self.v = (v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny))[None]

    def directions(self, start, stop):
        return self.v

    def value(self, xi, x):
        return _flat_sum(xi * xi).sqrt()

    def q0(self, xi, x):
        norm = _bcast(_flat_sum(xi * xi).sqrt(), xi)
        return torch.where(norm > 0, xi / norm.clamp_min(torch.finfo(xi.dtype).tiny), torch.zeros_like(xi))


class _LabelledLogits(Penalty):
    """Penalties on ``ξ_0 = ∇x Ψ^{y}`` for the label ``y`` of each sample (logits output), reading ``x``."""

    reads_x = True

    def __init__(self, y):
        super().__init__("logits")
        self.y = y

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        self.v = _one_hot(_check_labels(self.y, o.shape[0], o.shape[1]), o.shape[1], o)[None]

    def directions(self, start, stop):
        return self.v


class Relevance(_LabelledLogits):
    """DRR with LRP-z relevance ``r = x ⊙ ξ_0``: ``p = λ1‖r‖₁ + λ2‖r‖²₂``."""

    def __init__(self, y, l1=0.0, l2=0.0):
        super().__init__(y)
        if l1 < 0 or l2 < 0:
            raise ValueError(f"l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
        self.l1, self.l2 = float(l1), float(l2)

    native_name = "relevance"

    @property
    def native_head(self):
        return (self.native_name, self.l1, self.l2)

    def value(self, xi, x):
        r = x * xi
        return self.l1 * _flat_sum(r.abs()) + self.l2 * _flat_sum(r * r)

    def q0(self, xi, x):
        r = x * xi
        return x * (self.l1 * r.sign() + 2.0 * self.l2 * r)

    def input_grad(self, xi, x):
        r = x * xi
        return xi * (self.l1 * r.sign() + 2.0 * self.l2 * r)


class Alignment(_LabelledLogits):
    """Misalignment ``p = ‖x‖²‖ξ_0‖² − ⟨x, ξ_0⟩²`` (zero iff the saliency map is parallel to ``x``)."""

    native_name = "alignment"
    native_head = (native_name, 0.0, 0.0)

    def value(self, xi, x):
        x = x.unsqueeze(0)
        return _flat_sum(x * x) * _flat_sum(xi * xi) - _flat_sum(x * xi) ** 2

    def q0(self, xi, x):
        x = x.unsqueeze(0)
        return 2.0 * _bcast(_flat_sum(x * x), xi) * xi - 2.0 * _bcast(_flat_sum(x * xi), xi) * x

    def input_grad(self, xi, x):
        x = x.unsqueeze(0)
        return 2.0 * _bcast(_flat_sum(xi * xi), xi) * x - 2.0 * _bcast(_flat_sum(x * xi), xi) * xi


class GradientNorm(Penalty):
    """WGAN-GP / R1 for scalar critics: ``p = (‖ξ_0‖ − c)²`` with ``v = 1``."""

    def __init__(self, center=1.0):
        super().__init__("logits")
        self.center = float(center)

    native_name = "gradient_norm"

    @property
    def native_head(self):
        return (self.native_name, self.center, 0.0)

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        if o.shape[1] != 1:
            raise ValueError(f"GradientPenalty needs a scalar critic, output shape (batch, 1); got {tuple(o.shape)}")
        self.v = torch.ones_like(o)[None]

    def directions(self, start, stop):
        return self.v

    def value(self, xi, x):
        return (_flat_sum(xi * xi).sqrt() - self.center) ** 2

    def q0(self, xi, x):
        norm = _bcast(_flat_sum(xi * xi).sqrt(), xi)
        unit = torch.where(norm > 0, xi / norm.clamp_min(torch.finfo(xi.dtype).tiny), torch.zeros_like(xi))
        return 2.0 * (norm - self.center) * unit


class DoubleBackprop(SquaredNorm):
    """Classical double backprop ``ℓ + w‖∇x ℓ‖²`` for softmax + NLL (cross-entropy) or ``ℓ = ‖z_L − y‖²``.

    Here ``v`` depends on the output: ``ζ_L = x_L − y`` (softmax, ``η_L = S h``) or ``ζ_L = 2(z_L − y)``
    (``η_L = 2h``); ``∇θ ℓ`` reuses the ``ζ_j`` of the backward pass (folded into the forward-backward pass).
    """

    has_loss = True

    def __init__(self, y, weight=1.0, loss="cross_entropy"):
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
        super().__init__("softmax" if loss == "cross_entropy" else "logits")
        self.y, self.loss, self.scale = y, loss, float(weight)

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        B, C = o.shape
        if self.loss == "cross_entropy":
            self.target = _one_hot(_check_labels(self.y, B, C), C, o)
        else:
            y = self.y
            if not isinstance(y, Tensor) or not y.is_floating_point():
                raise TypeError("mse targets must be a floating-point tensor of shape (batch, outputs)")
            if y.dim() == 1 and C == 1:
                y = y[:, None]
            if tuple(y.shape) != (B, C):
                raise ValueError(f"mse targets must have shape ({B}, {C}), got {tuple(y.shape)}")
            if y.dtype != o.dtype or y.device != o.device:
                raise TypeError(f"mse targets must match the model output ({o.dtype}, {o.device}); "
                                f"got ({y.dtype}, {y.device})")
            self.target = y
        self.logits = o

    has_eta = True

    def directions(self, start, stop):
        return self.logits[None]  # placeholder: ζ_L is computed from the output itself

    def output_cotangent(self, v):
        if self.loss == "cross_entropy":
            return (self.probs - self.target).expand_as(v)
        return 2.0 * (v - self.target)

    def output_eta(self, v, h):
        return (softmax_adjoint(self.probs, h) if self.loss == "cross_entropy" else 2.0 * h).sum(0)

    def output_functional(self, o, v):
        return self.loss_value(o)

    def loss_value(self, o):
        if self.loss == "cross_entropy":
            return -(torch.log_softmax(o, dim=-1) * self.target).sum(-1)
        return ((o - self.target) ** 2).sum(-1)


def native_heads() -> Dict[str, bool]:
    """The Python side of the native head table: ``native_name -> reads_x`` over every head class (each name
    once; a subclass inherits its parent's row)."""
    table: Dict[str, bool] = {}
    todo = [Penalty]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.native_name is not None:
            if table.setdefault(cls.native_name, cls.reads_x) != cls.reads_x:
                raise RuntimeError(f"penalty heads disagree on reads_x for the native head {cls.native_name!r}")
    return table
