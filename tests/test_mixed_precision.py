"""Mixed precision: inside torch.autocast a penalty runs in the parameters' precision (autocast off), so it
agrees with autograd under the same autocast within autograd's own error against float64; GradScaler works."""
import pytest
import torch
import torch.nn as nn

import dbprop
from dbprop import fallback
from dbprop import functional as F
from dbprop import penalties as P

from helpers import grads_of

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_agrees_with_autograd_within_its_own_error(backend):
    model, x = _net(), torch.randn(4, 3, 10, 10)
    model64, x64 = _net().double(), x.double()
    truth = grads_of(F.jacobian_penalty(model64, x64, output="softmax", backend="python"), model64, x64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_v = F.jacobian_penalty(model, x, output="softmax", backend=backend)
        auto_v = fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x).mean()
    assert ours_v.dtype == torch.float32
    ours, auto = grads_of(ours_v, model, x), grads_of(auto_v, model, x)
    for o, a, t in zip(ours, auto, truth):
        autograd_error = _rel(a.double(), t)
        assert autograd_error > 1e-4  # autocast really ran in bf16 for autograd
        assert _rel(o.double(), t) < 1e-5  # ours: float32 throughout
        assert _rel(o.double(), a.double()) <= 2 * autograd_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_input_under_autocast_gets_a_bf16_gradient(backend):
    model = _net()
    x = torch.randn(4, 3, 10, 10).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = F.gradient_penalty(nn.Sequential(model, nn.Linear(5, 1)), x, backend=backend)
    value.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_grad_scaler_recipe_gives_the_unscaled_gradients():
    model, x, y = _net(), torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 2, 3])
    penalty = dbprop.JacobianPenalty(model, output="softmax")

    def step(scaler):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y) + 0.1 * penalty(x)
        if scaler is None:
            loss.backward()
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        return [p.grad.clone() for p in model.parameters()]

    plain = step(None)
    scaled = step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
