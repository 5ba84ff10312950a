"""Hardswish and Hardsigmoid (rows of dbprop.nodes.SMOOTH_ACTIVATIONS, kernels in csrc/kernels/activations.h).
Autograd cannot differentiate ``hardsigmoid_backward`` ("derivative ... is not implemented"), so penalties of
models with Hardsigmoid are compared with autograd double backprop of the same model written with
``dbprop.nodes.hardsigmoid_reference``: an expression equal to ``F.hardsigmoid`` in value and in PyTorch's
first-derivative convention (checked here), which autograd differentiates twice."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbprop
from dbprop import fallback, nodes
from dbprop import functional as Fn
from dbprop import penalties as P

from helpers import assert_grads_close, grads_of

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _points(dtype):
    z = torch.cat([4 * torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([-3.0, 3.0, 0.0, -3.5, 3.5, -2.999, 2.999])])
    return z.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_equals_hardsigmoid_and_its_derivative(dtype):
    z = _points(dtype).requires_grad_(True)
    ref, aten = nodes.hardsigmoid_reference(z), F.hardsigmoid(z)
    assert torch.equal(ref, aten)
    (d_ref,) = torch.autograd.grad(ref.sum(), z)
    (d_aten,) = torch.autograd.grad(aten.sum(), z)
    # 1/6 on the open interval (-3, 3), 0 elsewhere: also at z = ±3. In float64 aten's hardsigmoid_backward
    # multiplies by 1/6 rounded to float (relative 3e-8); the reference has the exact 1/6.
    assert torch.equal(d_ref != 0, d_aten != 0)
    torch.testing.assert_close(d_ref, d_aten, rtol=1e-7 if dtype == torch.float64 else 0.0, atol=0)
    if dtype == torch.float64:
        assert set(d_ref.unique().tolist()) == {0.0, 1 / 6}


def test_hardsigmoid_has_no_double_backward_in_autograd():
    """Why the reference exists (if PyTorch adds the formula, the reference stays correct, this test says so)."""
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(F.hardsigmoid(z).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(d.sum(), z)


class SqueezeExcite(nn.Module):
    """MobileNetV3's block shape: conv → Hardswish, a Hardsigmoid gate (module or functional) on a pooled branch,
    then a linear head. ``reference=True`` writes the gate with ``hardsigmoid_reference`` (same parameters)."""

    def __init__(self, functional: bool, reference: bool = False):
        super().__init__()
        self.functional, self.reference = functional, reference
        self.conv, self.act = nn.Conv2d(2, 4, 3, padding=1), nn.Hardswish()
        self.fc1, self.fc2 = nn.Linear(4 * 5 * 3, 7), nn.Linear(7, 5)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(self.act(self.conv(x)).flatten(1))
        h = self.fc2(F.hardswish(h))
        if self.reference:
            h = nodes.hardsigmoid_reference(h)
        elif self.functional:
            h = F.hardsigmoid(h)
        else:
            h = self.gate(h)
        return self.head(h)


def _pair(functional):
    torch.manual_seed(3)
    model = SqueezeExcite(functional).double()
    with torch.no_grad():  # pre-activations spread over (-3, 3) and beyond
        for p in model.parameters():
            p.mul_(3.0)
    twin = SqueezeExcite(functional, reference=True).double()
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_penalty_matches_autograd_of_the_reference(backend, functional, output):
    model, twin = _pair(functional)
    program = dbprop.compile_model(model)
    kinds = [type(op).__name__ for op in program.ops]
    assert "Opaque" not in kinds and kinds.count("SmoothActivation") == 3, kinds
    x = torch.randn(5, 2, 5, 3, dtype=torch.float64)
    x.requires_grad_(True)
    value = Fn.jacobian_penalty(model, x, output=output, backend=backend, strict=True)
    got = grads_of(value, model, x)
    ref = fallback.autograd_penalty(twin, P.JacobianFrobenius(output), x).mean()
    want = grads_of(ref, twin, x)
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    assert_grads_close(got, want, rtol=1e-9)
