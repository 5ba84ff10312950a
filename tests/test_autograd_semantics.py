"""A penalty behaves like any autograd graph: one backward unless retain_graph, in-place changes of its
inputs detected, saved tensors visible to hooks, a clear error for a second derivative."""
import pytest
import torch
import torch.nn as nn

import dbprop
from dbprop import functional as F
from dbprop.autograd import SECOND_DERIVATIVE_ERROR

from helpers import assert_grads_close

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _x(requires_grad=False):
    return torch.randn(6, 4, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_raises_unless_retained(backend, reduction):
    m, x = _net(), _x()
    R = F.jacobian_penalty(m, x, output="softmax", reduction=reduction, backend=backend).sum()
    R.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        R.backward()
    m.zero_grad()
    R = F.jacobian_penalty(m, x, output="softmax", reduction=reduction, backend=backend).sum()
    R.backward(retain_graph=True)
    once = [p.grad.clone() for p in m.parameters()]
    R.backward()
    for p, g in zip(m.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_or_input_changed_in_place_before_backward_raises(backend):
    m, x = _net(), _x(requires_grad=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    R = F.double_backprop_loss(m, x, torch.tensor([0, 1, 2, 0, 1, 2]), 0.5, backend=backend)
    R.backward(retain_graph=True)
    opt.step()  # the gradients of R belong to the old parameters
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        R.backward()
    R = F.jacobian_penalty(m, x, backend=backend)
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        R.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiating_the_gradient_again_raises_a_clear_error(backend):
    m, x = _net(), _x(requires_grad=True)
    R = F.jacobian_penalty(m, x, output="softmax", backend=backend)
    gx, gw = torch.autograd.grad(R, (x, m[0].weight), create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        gx.sum().backward()
    with pytest.raises(RuntimeError, match="not differentiable again"):
        (gw ** 2).sum().backward()
    assert "third derivatives" in SECOND_DERIVATIVE_ERROR
    # create_graph=True for OTHER terms of a loss is fine as long as nobody differentiates through the penalty
    R = F.jacobian_penalty(m, x, backend=backend)
    g = torch.autograd.grad(R + (m(x) ** 2).sum(), m[0].weight, create_graph=True)[0]
    assert g.requires_grad


def test_saved_tensor_hooks_see_the_saved_gradients_and_inputs():
    m, x = _net(), _x()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        R = F.jacobian_penalty(m, x, output="softmax")
    n_params = len(list(m.parameters()))
    assert len(packed) >= 1 + 2 * n_params  # x, the parameters, and one gradient per parameter
    assert any(t is x for t in packed)
    R.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_with_unequal_weights_is_exact_where_samples_are_coupled(backend):
    """Train-mode BatchNorm couples the samples: ∇x Σ w_b R_b is not w_b ∇x R_b row by row (this was wrong)."""
    from dbprop import fallback
    from dbprop import penalties as P
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = _x(requires_grad=True)
    w = torch.rand(6, dtype=torch.float64)
    v = F.jacobian_penalty(m, x, output="softmax", reduction="none", backend=backend)
    ours = torch.autograd.grad((v * w).sum(), [x, *m.parameters()])
    ref = torch.autograd.grad((fallback.autograd_penalty(m, P.JacobianFrobenius("softmax"), x) * w).sum(),
                              [x, *m.parameters()])
    assert_grads_close(ours, ref)  # the bias before BN has an exactly-zero gradient
