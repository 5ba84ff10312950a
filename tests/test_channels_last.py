"""Channels-last layouts (issue 17): the penalties are exact in float64 against reverse-over-reverse autograd
when the input ``x`` is ``torch.channels_last``, when the model was converted with
``model.to(memory_format=torch.channels_last)`` (channels-last convolution weights), and both, on every backend:

* a DAG net (the interpreter with native element kernels): convolutions with BatchNorm in train and eval mode,
  a depthwise stride-2 and a grouped convolution, a 1×1 convolution, a residual sum, adaptive average pooling;
* a plain chain (the native chain driver, and Algorithm 4 in one native call on the native backend):
  convolutions (depthwise stride 2, grouped stride 2, 1×1), (leaky) ReLU, max pooling, flatten, linear;
* every convolution formulation forced (dbprop/formulation.py), on channels-last arguments;
* layout invariance: the values and gradients equal those of the same model and input in the contiguous layout,
  the gradients reach ``.grad`` with the parameters' shapes, and one model may meet both layouts in turn.

Errors are measured against the global gradient scale (as in tests/test_real_models.py): the bias of a
convolution followed by train-mode BatchNorm has a true gradient of zero, where per-tensor errors mean nothing.
The penalties are those of the registry (tests/penalty_cases.py): the exact Jacobian penalty (logits, softmax),
DoubleBackpropLoss and GradientPenalty (on the scalar-critic variant of each net).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbprop
from dbprop import fallback
from dbprop import formulation as FM
from dbprop.nodes import Conv

from helpers import BACKENDS, grads_of
from nets import draw_input
from penalty_cases import CASES

TOL = 1e-10
B = 4
C = 5
#: the penalty cases run here; gradient-center1 runs on each net's scalar-critic variant
PENALTIES = ["jacobian-logits", "jacobian-softmax", "double-backprop-ce", "gradient-center1"]
#: which of (input, model) is channels-last
LAYOUTS = ["x", "model", "both"]


class ConvBN(nn.Module):
    """Conv + BatchNorm blocks: a depthwise stride-2 convolution, a 1×1 expansion, a grouped convolution on a
    residual branch, a stride-2 convolution, adaptive average pooling and a linear head."""

    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # a bias before BatchNorm: its true gradient is zero in train mode
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.down = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.stem(x)))
        h = F.silu(self.bn2(self.dw(h)))
        h = self.pw(h)
        h = h + F.leaky_relu(self.bn3(self.grouped(h)), 0.1)
        h = F.adaptive_avg_pool2d(torch.tanh(self.down(h)), 1).flatten(1)
        return self.fc(h)


def conv_chain(num_classes):
    """A plain chain of the native chain driver's kinds (12×12 input)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.LeakyReLU(0.1),
                         nn.Conv2d(8, 6, 1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, num_classes))


NETS = {"convbn": (ConvBN, (3, 8, 8)), "chain": (conv_chain, (3, 12, 12))}


def _setup(net, case, train, layout, seed=0, shape=None):
    """The model (float64, channels-last if ``layout`` says so), ``x`` (likewise, requiring grad; ``shape``: per
    sample, default the net's) and the case's label arguments; the scalar-critic variant for GradientPenalty."""
    make, default_shape = NETS[net]
    shape = shape or default_shape
    torch.manual_seed(seed)
    model = make(1 if CASES[case].nets == ("critic",) else C).double().train(train)
    x = draw_input(model, shape, B)
    if layout in ("model", "both"):
        model = model.to(memory_format=torch.channels_last)
        assert model.stem.weight.is_contiguous(memory_format=torch.channels_last) if net == "convbn" else \
            model[0].weight.is_contiguous(memory_format=torch.channels_last)
    if layout in ("x", "both"):
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    return model, x.requires_grad_(True), CASES[case].label_args(B, C, "cpu")


def _dbprop(model, x, case, args, backend):
    """The case's module form (strict: no fallback): value and the gradients of the parameters and of ``x``."""
    c = CASES[case]
    value = c.module(model, **c.options, backend=backend, strict=True)(x, *args)
    return value, grads_of(value, model, x)


def largest_error(got, want):
    """``(value, grads)`` pairs: the largest error of the value (relative) and of any gradient (relative to the
    largest gradient entry)."""
    (v, g), (r, w) = got, want
    scale = max(t.abs().max().item() for t in w)
    worst = max((a - b).abs().max().item() for a, b in zip(g, w)) / scale
    return max(worst, abs(v.item() - r.item()) / abs(r.item()))


def _autograd(model, x, case, args):
    ref = fallback.autograd_penalty(model, CASES[case].reference(args), x).mean()
    return ref, grads_of(ref, model, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", PENALTIES)
def test_conv_batchnorm_matches_autograd(case, train, layout, backend):
    model, x, args = _setup("convbn", case, train, layout)
    got = _dbprop(model, x, case, args, backend)
    err = largest_error(got, _autograd(model, x, case, args))
    assert torch.isfinite(got[0]) and got[0].abs() > 0
    assert err <= TOL, f"{case}, {layout} channels-last, {backend}: largest error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", PENALTIES)
def test_native_chain_matches_autograd(case, layout, backend):
    model, x, args = _setup("chain", case, False, layout)
    assert dbprop.compile_model(model).native_chain  # the native backend runs the chain driver
    got = _dbprop(model, x, case, args, backend)
    err = largest_error(got, _autograd(model, x, case, args))
    assert err <= TOL, f"{case}, {layout} channels-last, {backend}: largest error {err:.3g}"


def _applies(model, x, name):
    """Whether formulation ``name`` applies to some convolution of ``model`` at the input ``x``."""
    cls = next(c for c in FM.FORMULATIONS if c.name == name)
    seen = []
    probe = copy.deepcopy(model).eval()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(cls.applies(Conv("conv", m).products.g, i[0].shape)))
             for m in probe.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    return any(seen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [cls.name for cls in FM.FORMULATIONS])
def test_forced_formulation_on_channels_last(name, backend):
    """Each formulation forced on a channels-last model and input (4×4: ``dense`` applies to the last
    convolution's 2×2 → 1×1 map, ``pointwise`` to the 1×1 one, ``flipped`` and ``swapped`` to the stem)."""
    model, x, args = _setup("convbn", "jacobian-softmax", True, "both", seed=3, shape=(3, 4, 4))
    assert _applies(model, x, name)
    with FM.force(name):
        got = _dbprop(model, x, "jacobian-softmax", args, backend)
    err = largest_error(got, _autograd(model, x, "jacobian-softmax", args))
    assert err <= TOL, f"{name}, {backend}: largest error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", sorted(NETS))
def test_layout_does_not_change_values_or_gradients(net, backend):
    """The same model and input in the contiguous and the channels-last layout (a deep copy converted): equal
    values and gradients; ``.backward()`` fills ``.grad`` with the parameters' shapes, equal to the gradients."""
    case = "double-backprop-ce"
    model, x, args = _setup(net, case, False, "none")
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    plain = _dbprop(model, x, case, args, backend)
    v, g = _dbprop(model_cl, x_cl, case, args, backend)
    assert largest_error((v, g), plain) <= 1e-12
    assert g[-1].shape == x.shape
    v = CASES[case].module(model_cl, **CASES[case].options, backend=backend, strict=True)(x_cl, *args)
    v.backward()
    params = [p for p in model_cl.parameters()]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    assert largest_error((v, [p.grad for p in params] + [x_cl.grad]), (plain[0], plain[1])) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_model_meets_both_layouts(backend):
    """One model (one compiled program, one set of formulation choices) called with a contiguous input, then a
    channels-last one, then converted to channels-last in place and called with both: exact every time."""
    case = "jacobian-softmax"
    model, x, args = _setup("convbn", case, True, "none", seed=5)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    for convert in (False, True):
        if convert:
            model.to(memory_format=torch.channels_last)
        for inp in (x, x_cl):
            err = largest_error(_dbprop(model, inp, case, args, backend), _autograd(model, inp, case, args))
            assert err <= TOL, f"converted={convert}, input contiguous={inp.is_contiguous()}: {err:.3g}"
