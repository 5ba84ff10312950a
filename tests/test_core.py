"""The evaluation core (dbprop/core.py): the eager Function, the compile operator's implementation and the autograd
fallback agree (float64, train-mode BatchNorm coupling the samples, unequal incoming weights); a new penalty is
its head plus a few lines of the generic module."""
import warnings

import pytest
import torch
import torch.nn as nn

import dbprop
from dbprop import fallback
from dbprop import functional as F
from dbprop import ops
from dbprop import penalties as P
from dbprop.modules import PenaltyModule

from helpers import BACKENDS, assert_grads_close
from penalty_cases import CASES

#: penalty registry cases (tests/penalty_cases.py) run through every evaluation path: one without and one with a
#: loss term (which replaces the task forward and moves BatchNorm statistics)
PATH_CASES = ["jacobian-softmax", "double-backprop-ce"]


def _labels(name):
    args = CASES[name].label_args(6, 3, "cpu")
    return args[0] if args else None


HEADS = {name: lambda name=name: CASES[name].reference((_labels(name),)) for name in PATH_CASES}
MODULES = {name: (lambda m, name=name, **kw: CASES[name].module(m, **CASES[name].options, **kw), _labels(name))
           for name in PATH_CASES}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()  # train mode


class _Untraceable(nn.Module):
    """The same function, with data-dependent control flow torch.fx cannot trace: the autograd fallback."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) if bool(x.sum() == x.sum()) else -self.net(x)


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    w = torch.rand(6, dtype=torch.float64, generator=g) + 0.1  # unequal per-sample weights
    return x, w


def _weighted(value, reduction, w):
    return (value * w).sum() if reduction == "none" else 0.7 * value


def _reference(model, name, x, reduction, w):
    xr = x.clone().requires_grad_(True)
    value = dbprop.core.reduce(fallback.autograd_penalty(model, HEADS[name](), xr), reduction)
    grads = torch.autograd.grad(_weighted(value, reduction, w), [xr, *model.parameters()], materialize_grads=True)
    return value.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(HEADS))
def test_eager_operator_and_fallback_paths_agree(name, reduction, backend):
    model, (x, w) = _net(), _inputs()
    ref_value, ref = _reference(model, name, x, reduction, w)
    make, labels = MODULES[name]
    params = list(model.parameters())

    # eager: the autograd Function (backward through core.weighted_grads)
    xr = x.clone().requires_grad_(True)
    value = F.penalty(model, xr, HEADS[name](), reduction, backend=backend)
    eager = torch.autograd.grad(_weighted(value, reduction, w), [xr, *params])
    torch.testing.assert_close(value.detach(), ref_value, rtol=1e-10, atol=0)
    assert_grads_close(eager, ref)

    # the torch.compile operators' implementation (dbprop/ops.py), called directly: through the core
    pen = make(model, reduction=reduction, backend=backend)
    need = [True] * len(params)
    detached = [p.detach() for p in params]
    value, gx, gps = ops._implementation(pen._handle, x, labels, detached, need, True, None)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=0)
    if reduction == "none":
        _, gx, gps = ops._implementation(pen._handle, x, labels, detached, need, True, w)
    else:
        gx, gps = 0.7 * gx, [0.7 * g for g in gps]
    assert_grads_close([gx, *gps], ref)

    # the autograd fallback (strict=False on a model the passes cannot run), through the same Function
    wrapped = _Untraceable(model)
    xr = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dbprop.FallbackWarning)
        value = F.penalty(wrapped, xr, HEADS[name](), reduction, backend=backend, strict=False)
    fb = torch.autograd.grad(_weighted(value, reduction, w), [xr, *params])
    torch.testing.assert_close(value.detach(), ref_value, rtol=1e-10, atol=0)
    assert_grads_close(fb, ref)
    with pytest.raises(dbprop.UnsupportedModelError):
        F.penalty(wrapped, x, HEADS[name](), reduction, backend=backend, strict=True)


# ---------------------------------------------------------------------------- a new penalty in a few lines
class _Quartic(P.Penalty):
    """``p = s Σ ξ⁴`` for ``ξ = ∇x Σ_i x_L^i`` (``v = 1``)."""

    def __init__(self, scale=1.0):
        super().__init__("logits")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def setup(self, o, x, jacobian):
        super().setup(o, x, jacobian)
        self.v = torch.ones_like(o)[None]

    def directions(self, start, stop):
        return self.v

    def value(self, xi, x):
        return self.scale * (xi ** 4).flatten(2).sum(-1)

    def q0(self, xi, x):
        return 4.0 * self.scale * xi ** 3


class QuarticPenalty(PenaltyModule):
    def __init__(self, model, scale=1.0, reduction="mean", backend="auto", strict=False):
        super().__init__(model, reduction, backend, strict, scale=scale)

    def _head(self, labels):
        return _Quartic(self.scale)

    def forward(self, x):
        return self._evaluate(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_new_penalty_is_its_head_plus_a_small_generic_module(reduction, backend):
    model, (x, w) = _net(), _inputs()
    with pytest.raises(ValueError, match="scale must be > 0"):  # options validated by building the head once
        QuarticPenalty(model, scale=-1.0)
    pen = QuarticPenalty(model, scale=0.3, reduction=reduction, backend=backend)
    assert list(pen.parameters()) == [] and pen.model is model
    xr = x.clone().requires_grad_(True)
    value = pen(xr)
    got = torch.autograd.grad(_weighted(value, reduction, w), [xr, *model.parameters()], materialize_grads=True)
    xf = x.clone().requires_grad_(True)
    ref_value = dbprop.core.reduce(fallback.autograd_penalty(model, _Quartic(0.3), xf), reduction)
    ref = torch.autograd.grad(_weighted(ref_value, reduction, w), [xf, *model.parameters()], materialize_grads=True)
    torch.testing.assert_close(value.detach(), ref_value.detach(), rtol=1e-10, atol=0)
    assert_grads_close(got, ref)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("path,reduction", [("program", "mean"), ("fallback", "none")])
def test_compiled_step_runs_smooth_activations_and_the_fallback_like_eager(path, reduction):
    """The operator's implementation runs below the autograd key: the core's local autograd (smooth activations,
    opaque nodes, the fallback) must still work there."""
    net, (x, w) = _net(), _inputs()
    pen = dbprop.JacobianPenalty(net if path == "program" else _Untraceable(net), output="softmax",
                                 reduction=reduction)

    def step(x):
        return _weighted(pen(x), reduction, w)

    got = []
    for f in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        xr = x.clone().requires_grad_(True)
        value = f(xr)
        got.append((value.detach(), torch.autograd.grad(value, [xr, *net.parameters()])))
    torch._dynamo.reset()
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-12, atol=0)
    assert_grads_close(got[1][1], got[0][1])
