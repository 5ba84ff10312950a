"""Weight parametrizations (docs/maths.md §4.16): ``spectral_norm``, ``weight_norm``, ``orthogonal`` and a user
parametrization on Conv and Linear weights and biases, read once per call, exact against reverse-over-reverse
autograd in float64, with spectral normalisation's power-iteration state moved exactly as by one ``model(x)``;
the older hook-based ``torch.nn.utils.spectral_norm`` / ``weight_norm`` and parametrized tensors read elsewhere are
refused with a clear error."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as PZ
from torch.nn.utils import parametrize

import dbprop
from dbprop import fallback
from dbprop import functional as Fn
from dbprop import penalties as P

from helpers import BACKENDS, assert_grads_close, grads_of


class Scaled(nn.Module):
    """A user parametrization with its own parameter: ``W ↦ s · W``."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.3))

    def forward(self, w):
        return self.s * w


def _critic(kind: str, outputs: int) -> nn.Module:
    """conv (stride 2) - LeakyReLU - depthwise conv - LeakyReLU - linear - tanh - linear, parametrized by ``kind``
    ("..._chain": LeakyReLU for tanh, a chain the native chain driver runs)."""
    c1, c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
    l1, l2 = nn.Linear(36, 5), nn.Linear(5, outputs)
    if kind.startswith("spectral_norm"):
        c1, c2, l1, l2 = map(PZ.spectral_norm, (c1, c2, l1, l2))
    elif kind == "weight_norm":
        c1, l1 = PZ.weight_norm(c1), PZ.weight_norm(l1, dim=None)
    elif kind == "orthogonal":
        l1 = PZ.orthogonal(nn.Linear(36, 5))
        c1 = PZ.spectral_norm(c1)
    elif kind == "user":
        parametrize.register_parametrization(l1, "weight", Scaled())
        parametrize.register_parametrization(l1, "bias", Scaled())
        parametrize.register_parametrization(c1, "weight", Scaled())
    act = nn.LeakyReLU(0.1) if kind.endswith("_chain") else nn.Tanh()
    return nn.Sequential(c1, nn.LeakyReLU(0.2), c2, nn.LeakyReLU(0.2), nn.Flatten(), l1, act, l2)


KINDS = ["spectral_norm", "spectral_norm_chain", "weight_norm", "orthogonal", "user"]
LABELS = torch.tensor([0, 2, 1, 2])
#: penalty -> (model outputs, the dbprop call, the reference head)
HEADS = {"jacobian": (3, lambda m, x, b: Fn.jacobian_penalty(m, x, output="softmax", backend=b, strict=True),
                      P.JacobianFrobenius("softmax")),
         "gradient_penalty": (1, lambda m, x, b: Fn.gradient_penalty(m, x, backend=b, strict=True),
                              P.GradientNorm(1.0)),
         # replaces the task forward: the power-iteration state moves (as BatchNorm statistics do)
         "double_backprop": (3, lambda m, x, b: Fn.double_backprop_loss(m, x, LABELS, 0.7, backend=b, strict=True),
                             P.DoubleBackprop(LABELS, 0.7, "cross_entropy"))}


def _model(kind: str, train: bool, outputs: int = 3) -> nn.Module:
    torch.manual_seed(3)
    return _critic(kind, outputs).double().train(train)


def _state(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reverse_over_reverse_autograd(kind, train, head, backend):
    outputs, call, reference = HEADS[head]
    model = _model(kind, train, outputs)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    before = _state(model)
    value = call(model, x, backend)
    after = _state(model)
    with torch.no_grad():  # the reference starts from the same power-iteration state
        for name, b in model.named_buffers():
            b.copy_(before[name])
    ref = fallback.autograd_penalty(model, reference, x).mean()
    for name, b in model.named_buffers():  # the state moved as by the reference (one model(x), or not at all)
        torch.testing.assert_close(after[name], b, rtol=0, atol=0)
        moves = train and reference.has_loss and name.endswith(("_u", "_v"))
        assert torch.equal(b, before[name]) != moves
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    got, want = grads_of(value, model, x), grads_of(ref, model, x)
    assert len(want) > len([p for m in model for p in m.parameters(recurse=False)])  # the originals are among them
    assert_grads_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("kind", ["spectral_norm", "spectral_norm_chain"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_weights_recompute_and_an_optimizer_step(kind, backend):
    """``reduction="none"`` with unequal incoming weights recomputes with the call's pinned weights (the state
    does not move again); after an optimizer step on the originals the next call reads the new weights."""
    model = _model(kind, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=torch.float64)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        before = _state(model)
        values = Fn.penalty(model, x, P.JacobianFrobenius("logits"), reduction="none", backend=backend, strict=True)
        got = grads_of((values * w).sum(), model, x)
        after = _state(model)
        assert all(torch.equal(after[k], before[k]) for k in before)  # a penalty without a loss moves nothing
        ref = fallback.autograd_penalty(model, P.JacobianFrobenius("logits"), x)
        torch.testing.assert_close(values.detach(), ref.detach(), rtol=1e-10, atol=0)
        assert_grads_close(got, grads_of((ref * w).sum(), model, x), rtol=1e-9)
        for p, g in zip(model.parameters(), got):
            p.grad = g
        opt.step()


def test_the_program_reads_the_parametrization_parameters():
    assert dbprop.compile_model(_model("spectral_norm_chain", True)).native_chain  # with the call's weights
    model = _model("weight_norm", True)
    program = dbprop.compile_model(model)
    conv = model[0]
    leaves = [conv.parametrizations.weight.original0, conv.parametrizations.weight.original1]
    assert all(any(p is leaf for p in program.parameters()) for leaf in leaves)
    assert not any(p is conv.weight for p in program.parameters())


class ReadsDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = PZ.spectral_norm(nn.Linear(4, 3))

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(x), self.lin.weight)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Linear(4, 3), PZ.weight_norm(nn.BatchNorm1d(3)), nn.Linear(3, 2)), "'1' \\(BatchNorm1d\\)"),
    (ReadsDirectly, "'lin.weight' is read directly"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1)), PZ.spectral_norm(nn.ConvTranspose1d(4, 2, 1)),
                           nn.Flatten()), "'2' \\(ConvTranspose1d\\) .* opaque"),
])
def test_parametrized_tensors_read_elsewhere_are_refused(make, match):
    model = make().double()
    with pytest.raises(dbprop.UnsupportedModelError, match=match):
        dbprop.compile_model(model)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(dbprop.FallbackWarning):  # and the penalty falls back to autograd, exact
        value = Fn.jacobian_penalty(model.train(False), x)
    ref = fallback.autograd_penalty(model, P.JacobianFrobenius("logits"), x).mean()
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("legacy", [torch.nn.utils.spectral_norm, torch.nn.utils.weight_norm])
def test_hook_based_spectral_and_weight_norm_are_refused_clearly(legacy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        model = nn.Sequential(legacy(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2)).double()
    with pytest.raises(dbprop.UnsupportedModelError, match="torch.nn.utils.parametrizations.spectral_norm"):
        dbprop.compile_model(model)
