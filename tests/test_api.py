"""Modules, reductions, shapes and layouts, float32, frozen parameters, fallback and errors."""
import warnings

import pytest
import torch
from torch import nn

import dbprop
from dbprop import functional as F
from dbprop import penalties as P

from helpers import compare, max_rel_err
from nets import build, draw_input

TOL = 1e-9


# ------------------------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_reductions(reduction, output):
    model, shape = build("conv2d")
    x = draw_input(model, shape, 4).requires_grad_(True)
    weights = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64) if reduction == "none" else None
    _, _, err = compare(model, x, lambda: F.jacobian_penalty(model, x, output=output, reduction=reduction),
                        P.JacobianFrobenius(output), reduction=reduction, weights=weights)
    assert err <= TOL


def test_none_reduction_uniform_weights_and_per_sample_values():
    model, shape = build("mlp")
    x = draw_input(model, shape, 4)
    per_sample = F.jacobian_penalty(model, x, output="softmax", reduction="none")
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample.mean(), F.jacobian_penalty(model, x, output="softmax"))
    torch.testing.assert_close(per_sample.sum(), F.jacobian_penalty(model, x, output="softmax", reduction="sum"))
    for i in range(4):  # R_b depends on sample b alone
        torch.testing.assert_close(F.jacobian_penalty(model, x[i:i + 1], output="softmax"), per_sample[i])


# ----------------------------------------------------------------------------------- shapes and layouts
def test_batch_size_one():
    model, shape = build("conv1d")
    x = draw_input(model, shape, 1).requires_grad_(True)
    _, _, err = compare(model, x, lambda: F.jacobian_penalty(model, x, output="softmax"),
                        P.JacobianFrobenius("softmax"))
    assert err <= TOL


@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_single_output(output):
    model, shape = build("conv2d", C=1)
    x = draw_input(model, shape, 3).requires_grad_(True)
    value, _, err = compare(model, x, lambda: F.jacobian_penalty(model, x, output=output),
                            P.JacobianFrobenius(output))
    assert err <= TOL
    if output == "softmax":  # softmax of one output is constant
        assert value == 0


def test_non_contiguous_input():
    model, shape = build("mlp")
    base = draw_input(model, (4, 3), 3)
    x = base.transpose(1, 2)  # shape (3, 3, 4), not contiguous
    assert not x.is_contiguous()
    x.requires_grad_(True)
    _, _, err = compare(model, x, lambda: F.jacobian_penalty(model, x, output="softmax"),
                        P.JacobianFrobenius("softmax"))
    assert err <= TOL


@pytest.mark.parametrize("net", ["conv2d", "conv2d_options"])
def test_channels_last(net):
    model, shape = build(net)
    x = draw_input(model, shape, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    model = model.to(memory_format=torch.channels_last)
    _, _, err = compare(model, x, lambda: F.jacobian_penalty(model, x, output="softmax", chunk_size=2),
                        P.JacobianFrobenius("softmax"))
    assert err <= TOL


@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_float32_agrees_at_float32_tolerance(output):
    model, shape = build("conv2d")
    x = draw_input(model, shape, 4)
    ref = F.jacobian_penalty(model, x, output=output)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    model32, x32 = model.float(), x.float()
    val = F.jacobian_penalty(model32, x32, output=output)
    g = torch.autograd.grad(val, list(model32.parameters()))
    assert val.dtype == torch.float32
    assert max_rel_err([val.double()], [ref]) < 1e-4
    assert max_rel_err([t.double() for t in g], g_ref) < 1e-3


def test_frozen_parameters_and_input_gradient_only():
    model, shape = build("conv2d")
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)
    x = draw_input(model, shape, 3).requires_grad_(True)
    _, _, err = compare(model, x, lambda: F.relevance_penalty(model, x, torch.tensor([0, 1, 2]), l2=1.0),
                        P.Relevance(torch.tensor([0, 1, 2]), 0.0, 1.0))
    assert err <= TOL
    for p in model.parameters():
        p.requires_grad_(False)
    value = F.jacobian_penalty(model, x, output="softmax")
    (gx,) = torch.autograd.grad(value, x)
    with torch.enable_grad():
        ref = dbprop.fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x).mean()
    assert max_rel_err([gx], torch.autograd.grad(ref, x)) <= TOL


def test_no_grad_returns_plain_value():
    model, shape = build("mlp")
    x = draw_input(model, shape)
    with torch.no_grad():
        value = F.jacobian_penalty(model, x)
    assert not value.requires_grad
    torch.testing.assert_close(value, dbprop.fallback.autograd_penalty(model, P.JacobianFrobenius(), x).mean().detach())


def test_program_reads_live_parameters():
    model, shape = build("mlp")
    x = draw_input(model, shape)
    penalty = dbprop.JacobianPenalty(model)
    before = penalty(x).detach()
    with torch.no_grad():
        model[-1].weight.mul_(2.0)  # J = W_L (...): the penalty scales by 4
    assert torch.allclose(penalty(x).detach(), 4.0 * before)


# ------------------------------------------------------------------------------------------------ modules
def test_modules_equal_functional_and_train_with_optimizer():
    model, shape = build("conv2d")
    x = draw_input(model, shape, 4)
    y = torch.tensor([0, 1, 2, 3])
    pairs = [
        (dbprop.JacobianPenalty(model, output="softmax", chunk_size=2)(x), F.jacobian_penalty(model, x, "softmax")),
        (dbprop.OutputGradientPenalty(model)(x, y), F.output_gradient_penalty(model, x, y)),
        (dbprop.DoubleBackpropLoss(model, 0.1)(x, y), F.double_backprop_loss(model, x, y, 0.1)),
        (dbprop.RelevancePenalty(model, l1=0.1)(x, y), F.relevance_penalty(model, x, y, l1=0.1)),
        (dbprop.AlignmentPenalty(model)(x, y), F.alignment_penalty(model, x, y)),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    a = dbprop.SpectralNormPenalty(model, power_iterations=2)(x)
    torch.manual_seed(0)
    torch.testing.assert_close(a, F.spectral_norm_penalty(model, x, power_iterations=2))
    penalty = dbprop.JacobianPenalty(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    first = penalty(x).item()
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y) + 0.1 * penalty(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert penalty(x).item() != first


def test_gradient_penalty_module():
    model, shape = build("critic")
    x = draw_input(model, shape, 4)
    torch.testing.assert_close(dbprop.GradientPenalty(model, center=0.5)(x), F.gradient_penalty(model, x, 0.5))


def test_backend_selection_and_info():
    info = dbprop.backend_info()
    assert info["auto"] in ("native", "python") and info["native_available"] == dbprop.native_available()
    model, shape = build("mlp")
    x = draw_input(model, shape)
    torch.testing.assert_close(F.jacobian_penalty(model, x, backend="python"), F.jacobian_penalty(model, x))
    with pytest.raises(ValueError, match="backend"):
        F.jacobian_penalty(model, x, backend="gpu")
    if not dbprop.native_available():
        with pytest.raises(RuntimeError, match="native"):
            F.jacobian_penalty(model, x, backend="native")


def test_compile_model_unwraps_data_parallel():
    model, _ = build("mlp")
    program = dbprop.compile_model(nn.DataParallel(model))
    assert program.model is model


# ------------------------------------------------------------------------------------------ unsupported
class _Custom(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


def test_untraceable_model_error_names_the_tracer_reason():
    with pytest.raises(dbprop.UnsupportedModelError, match="torch.fx cannot trace _Custom.*TraceError"):
        dbprop.compile_model(_Custom())
    with pytest.raises(dbprop.UnsupportedModelError, match="one input"):
        dbprop.compile_model(_TwoInputs())


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.fc(x + y)


def test_unsupported_model_falls_back_with_one_warning_or_raises_when_strict():
    torch.manual_seed(0)
    model = _Custom().double()
    x = torch.randn(3, 5, dtype=torch.float64)
    penalty = dbprop.JacobianPenalty(model, output="softmax")
    with pytest.warns(dbprop.FallbackWarning, match="_Custom"):
        value = penalty(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = penalty(x)  # no second warning for the same model
    torch.testing.assert_close(value, again)
    ref = dbprop.fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x).mean()
    torch.testing.assert_close(value, ref)
    assert max_rel_err(torch.autograd.grad(value, list(model.parameters())),
                       torch.autograd.grad(ref, list(model.parameters()))) < 1e-12
    with pytest.raises(dbprop.UnsupportedModelError):
        dbprop.JacobianPenalty(model, strict=True)(x)


# ------------------------------------------------------------------------------------------------ errors
def test_wrong_input_shape():
    model, shape = build("conv2d")
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 2, H, W\)"):
        F.jacobian_penalty(model, torch.randn(2, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(batch, 2, H, W\); got shape \(2, 3, 8, 8\)"):
        F.jacobian_penalty(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    mlp, _ = build("dropout_train")
    with pytest.raises(ValueError, match="6 input features"):
        F.jacobian_penalty(mlp, torch.randn(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        F.jacobian_penalty(mlp, torch.randn(0, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="batched"):
        F.jacobian_penalty(mlp, torch.randn(6, dtype=torch.float64))


def test_labels_out_of_range_and_bad_labels():
    model, shape = build("mlp")
    x = draw_input(model, shape)
    with pytest.raises(ValueError, match=r"out of range.*\[0, 4\)"):
        F.output_gradient_penalty(model, x, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="out of range"):
        F.double_backprop_loss(model, x, torch.tensor([-1, 0, 1]), 1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        F.alignment_penalty(model, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer dtype"):
        F.relevance_penalty(model, x, torch.tensor([0.0, 1.0, 2.0]), l1=1.0)
    with pytest.raises(ValueError, match=r"mse targets must have shape \(3, 4\)"):
        F.double_backprop_loss(model, x, torch.zeros(3, 5, dtype=torch.float64), 1.0, loss="mse")


def test_dtype_and_device_mismatch():
    model, shape = build("mlp")
    with pytest.raises(TypeError, match="dtype mismatch.*float32.*float64"):
        F.jacobian_penalty(model, torch.randn(2, *shape))
    with pytest.raises(ValueError, match="meta tensor"):
        F.jacobian_penalty(model, torch.randn(2, *shape, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="floating-point"):
        F.jacobian_penalty(model, torch.ones(2, *shape, dtype=torch.long))


def test_non_finite_input():
    model, shape = build("mlp")
    x = draw_input(model, shape)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        F.jacobian_penalty(model, x)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_options(bad):
    model, _ = build("mlp")
    with pytest.raises(ValueError, match="chunk_size"):
        dbprop.JacobianPenalty(model, chunk_size=bad)
    with pytest.raises(ValueError, match="num_projections"):
        dbprop.JacobianPenalty(model, estimator="random", num_projections=bad)
    with pytest.raises(ValueError, match="power_iterations"):
        dbprop.SpectralNormPenalty(model, power_iterations=bad)
    x = draw_input(model, (3, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        F.jacobian_penalty(model, x, chunk_size=bad)


def test_bad_names():
    model, _ = build("mlp")
    for kwargs in (dict(output="probs"), dict(estimator="hutchinson"), dict(reduction="avg")):
        with pytest.raises(ValueError):
            dbprop.JacobianPenalty(model, **kwargs)
    with pytest.raises(ValueError, match="loss"):
        dbprop.DoubleBackpropLoss(model, 1.0, loss="hinge")
    with pytest.raises(ValueError, match="l1 and l2"):
        dbprop.RelevancePenalty(model, l1=-1.0)


def test_missing_extension_warns_once_and_runs_python(monkeypatch):
    from dbprop import backends
    monkeypatch.setattr(backends, "_native", None)
    monkeypatch.setattr(backends, "_warned_python", False)
    assert not dbprop.native_available() and dbprop.backend_info()["auto"] == "python"
    model, shape = build("mlp")
    x = draw_input(model, shape)
    with pytest.warns(RuntimeWarning, match="native extension dbprop._C is not built"):
        value = F.jacobian_penalty(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.jacobian_penalty(model, x)  # one warning per process
    torch.testing.assert_close(value, F.jacobian_penalty(model, x, backend="python"))


# ------------------------------------------------------------------------------------- more bad input
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_label_dtype_is_cast(dtype):
    model, shape = build("mlp")
    x = draw_input(model, shape)
    y = torch.tensor([0, 3, 1])
    for fn in (lambda y: F.double_backprop_loss(model, x, y, 0.5), lambda y: F.relevance_penalty(model, x, y, l2=1.0),
               lambda y: F.alignment_penalty(model, x, y), lambda y: F.output_gradient_penalty(model, x, y)):
        assert torch.equal(fn(y.to(dtype)), fn(y))
    with pytest.raises(TypeError, match="integer dtype"):
        F.alignment_penalty(model, x, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="bool"):
        F.output_gradient_penalty(model, x, True)


def test_model_must_be_a_module_and_backend_is_checked_at_construction():
    with pytest.raises(TypeError, match="torch.nn.Module, got NoneType"):
        dbprop.JacobianPenalty(None)
    with pytest.raises(TypeError, match="torch.nn.Module, got NoneType"):
        F.jacobian_penalty(None, torch.randn(2, 3))
    model, _ = build("mlp")
    with pytest.raises(ValueError, match="backend must be one of"):
        dbprop.JacobianPenalty(model, backend="bogus")
    with pytest.raises(TypeError, match="strict must be a bool"):
        dbprop.JacobianPenalty(model, strict="yes")


def test_sparse_input_is_refused():
    model, shape = build("mlp")
    with pytest.raises(TypeError, match="dense"):
        F.jacobian_penalty(model, draw_input(model, shape).to_sparse())


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)  # data-dependent control flow


def test_fallback_path_checks_its_input_like_the_native_one():
    model = _Untraceable().double()
    with pytest.raises(ValueError, match="non-finite"):
        F.jacobian_penalty(model, torch.tensor([[1.0, float("inf"), 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        F.jacobian_penalty(model, torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        F.jacobian_penalty(model, torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------ penalty modules own no parameters
def test_penalty_modules_own_no_parameters_and_leave_the_model_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    pens = [dbprop.JacobianPenalty(model), dbprop.DoubleBackpropLoss(model, 0.1), dbprop.GradientPenalty(model),
            dbprop.SpectralNormPenalty(model), dbprop.AlignmentPenalty(model), dbprop.RelevancePenalty(model, l2=1.0),
            dbprop.OutputGradientPenalty(model)]
    for pen in pens:
        assert list(pen.parameters()) == [] and list(pen.buffers()) == [] and pen.state_dict() == {}
        assert pen.model is model and "model=Sequential" in repr(pen)
        pen.double()
        pen.eval()
        assert model[0].weight.dtype == torch.float32 and model.training
    pen = pens[0]
    other = nn.Linear(4, 3)
    pen.model = other
    assert pen.model is other and list(pen.parameters()) == []
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pen.model = None
    # one optimizer over both "parameter groups" no longer sees duplicates
    torch.optim.Adam([{"params": model.parameters()}, {"params": pens[1].parameters()}])
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    pens[1](x, y).backward()
    assert all(p.grad is not None for p in model.parameters())
