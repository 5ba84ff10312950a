"""Convolution formulations (docs/maths.md §4.1, dbprop/formulation.py): every formulation of K, Kᵀ and K□ equals
``aten.convolution`` / ``aten.convolution_backward`` in float64 on varied geometries; each one forced through a
whole DAG penalty matches autograd double backprop; the choice is cached, and untimed under deterministic mode."""
import pytest
import torch
from torch import nn

import dbprop
from dbprop import fallback, penalties as P
from dbprop import formulation as FM
from dbprop import functional as Fn
from dbprop.nodes import Conv

from helpers import assert_grads_close, deterministic_algorithms, grads_of

# (conv module, per-sample input shape): small maps (dense applies), 1×1 kernels (pointwise), 1-d, dilation,
# asymmetric 'same' padding, stride larger than the map, odd sizes
GEOMETRIES = [
    (lambda: nn.Conv2d(3, 5, 3, 1, 1), (3, 1, 1)),
    (lambda: nn.Conv2d(3, 5, 3, 1, 1), (3, 2, 2)),
    (lambda: nn.Conv2d(3, 4, 3, 2, 1), (3, 2, 3)),
    (lambda: nn.Conv2d(2, 3, (2, 3), (2, 1), (1, 0)), (2, 3, 3)),
    (lambda: nn.Conv2d(2, 3, 2, 1, "same", dilation=1), (2, 2, 1)),
    (lambda: nn.Conv2d(2, 3, 3, 1, "same", dilation=2), (2, 3, 2)),
    (lambda: nn.Conv2d(4, 6, 1), (4, 3, 5)),
    (lambda: nn.Conv2d(4, 6, 1, 2), (4, 5, 4)),
    (lambda: nn.Conv2d(4, 6, 1, 3), (4, 2, 7)),
    (lambda: nn.Conv1d(3, 4, 3, 1, 1), (3, 2)),
    (lambda: nn.Conv1d(3, 4, 4, 1, "same"), (3, 3)),
    (lambda: nn.Conv1d(3, 5, 1, 2), (3, 5)),
    (lambda: nn.Conv2d(4, 6, 3, 1, 1, groups=2), (4, 2, 2)),
    (lambda: nn.Conv2d(3, 4, 3, 1, 1), (3, 6, 6)),
]


def _node(make, seed=0):
    torch.manual_seed(seed)
    return Conv("conv", make().double())


@pytest.mark.parametrize("make,shape", GEOMETRIES)
def test_every_formulation_equals_aten(make, shape):
    op = _node(make)
    w, prods = op.weight, op.products
    rows = 5
    x = torch.randn(rows, *shape, dtype=torch.float64)
    y = prods.aten.K(w, x)
    c = torch.randn_like(y)
    in_shape = x.shape
    ref = (prods.aten.K(w, x), prods.aten.Kt(w, c, in_shape), prods.aten.Kbox(w, x, c))
    assert torch.allclose(ref[0], torch.nn.functional.conv2d(x, w, None, op.module.stride, op.module.padding,
                                                             op.module.dilation, op.module.groups)
                          if op.dim == 2 else torch.nn.functional.conv1d(
                              x, w, None, op.module.stride, op.module.padding, op.module.dilation, op.module.groups),
                          rtol=1e-12, atol=1e-12)
    applicable = [cls for cls in FM.FORMULATIONS if cls.applies(prods.g, in_shape)]
    assert FM.Aten in applicable
    for cls in applicable:
        f = prods._impl(cls, in_shape, w.shape)
        run = {"K": lambda: f.K(w, x), "Kt": lambda: f.Kt(w, c, in_shape), "Kbox": lambda: f.Kbox(w, x, c)}
        for name, b in zip(FM.PRODUCTS, ref):
            if name not in cls.products:
                continue
            a = run[name]()
            assert a.shape == b.shape, (cls.name, name)
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (cls.name, name, (a - b).abs().max())


def test_applicability():
    """Which geometries each formulation covers (so the equality test above reaches every formulation)."""
    covered = {cls.name: 0 for cls in FM.FORMULATIONS}
    for make, shape in GEOMETRIES:
        op = _node(make)
        for cls in FM.FORMULATIONS:
            covered[cls.name] += cls.applies(op.products.g, (1, *shape))
    assert all(covered.values()), covered
    g = _node(lambda: nn.Conv2d(4, 6, 3, 1, 1, groups=2)).products.g
    assert not FM.Dense.applies(g, (1, 4, 2, 2)) and not FM.Pointwise.applies(g, (1, 4, 2, 2))
    assert not FM.Dense.applies(_node(lambda: nn.Conv2d(3, 4, 3, 1, 1)).products.g, (1, 3, 6, 6))


def test_dense_matrix_follows_the_live_weight():
    op = _node(lambda: nn.Conv2d(3, 5, 3, 1, 1))
    f = op.products._impl(FM.Dense, (1, 3, 2, 2), op.weight.shape)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    f.K(op.weight, x)
    with torch.no_grad():
        op.weight.mul_(2.0)  # an optimizer step: new version, the matrix is rebuilt
    assert torch.allclose(f.K(op.weight, x), op.products.aten.K(op.weight, x), rtol=1e-12, atol=1e-12)


class SmallMaps(nn.Module):
    """A ResNet tail at 32 → 1 positions: dense, pointwise and aten all apply somewhere; train-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 6, 3, 2, 1)
        self.down = nn.Conv2d(4, 6, 1, 2)
        self.b = nn.Conv2d(6, 6, 3, 1, 1)
        self.c = nn.Conv1d(6, 5, 3, 1, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.tanh(self.a(h)) + self.down(h)
        h = torch.relu(self.b(h)).flatten(2)
        return self.fc(torch.nn.functional.gelu(self.c(h)).mean(2))


@pytest.mark.parametrize("name", [cls.name for cls in FM.FORMULATIONS])
@pytest.mark.parametrize("backend", ["python"] + (["native"] if dbprop.native_available() else []))
def test_forced_formulation_matches_autograd(name, backend):
    torch.manual_seed(1)
    model = SmallMaps().double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    head = P.JacobianFrobenius("softmax", "exact", 1)
    with FM.force(name):
        value = Fn.jacobian_penalty(model, x, output="softmax", backend=backend, strict=True)
        got = grads_of(value, model, x)
    ref = fallback.autograd_penalty(model, head, x).mean()
    want = grads_of(ref, model, x)
    assert abs(value.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert_grads_close(got, want, rtol=1e-9)


def test_choice_is_timed_once_and_cached():
    from dbprop.program import cached_program
    torch.manual_seed(2)
    model = SmallMaps().double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pen = dbprop.JacobianPenalty(model, chunk_size=3, strict=True)
    pen(x).backward()
    convs = [op for op in cached_program(model).ops if isinstance(op, Conv)]
    chosen = [op.products.chosen() for op in convs]
    assert any(chosen), "no product had more than one candidate"
    for c in chosen:
        assert set(c.values()) <= {cls.name for cls in FM.FORMULATIONS}
        assert {k[0] for k in c} <= set(FM.PRODUCTS)
    pen(x).backward()  # same shapes: nothing new is timed, nothing changes
    assert [op.products.chosen() for op in convs] == chosen


def test_deterministic_mode_and_set_tuning_time_nothing():
    torch.manual_seed(3)
    model = SmallMaps().double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    from dbprop.program import cached_program
    with deterministic_algorithms():
        dbprop.JacobianPenalty(model, strict=True)(x)
    assert all(not op.products.chosen() for op in cached_program(model).ops if isinstance(op, Conv))
    FM.set_tuning(False)
    try:
        dbprop.JacobianPenalty(model, strict=True)(x)
        assert all(not op.products.chosen() for op in cached_program(model).ops if isinstance(op, Conv))
    finally:
        FM.set_tuning(True)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        FM.set_tuning(1)
    with pytest.raises(ValueError, match="unknown formulation"):
        FM.force("winograd")
