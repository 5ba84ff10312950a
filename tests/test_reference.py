"""The oracle itself: the autograd fallback and the analytic q_0 / ∂p/∂x of every penalty, checked against
independent computations (torch.func Jacobians, autograd of p)."""
import pytest
import torch
from torch.func import jacrev, vmap

from dbprop import fallback
from dbprop import penalties as P

from nets import build, draw_input


def _jacobians(model, x, softmax=False):
    def f(xb):
        o = model(xb[None])[0]
        return torch.softmax(o, -1) if softmax else o
    return vmap(jacrev(f))(x)  # (B, C, *in)


@pytest.mark.parametrize("net", ["mlp", "conv2d", "conv1d"])
@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_fallback_jacobian_equals_func_jacobian(net, output):
    model, shape = build(net)
    x = draw_input(model, shape)
    J = _jacobians(model, x, output == "softmax")
    expected = J.flatten(2).pow(2).sum((1, 2))
    got = fallback.autograd_penalty(model, P.JacobianFrobenius(output), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_fallback_double_backprop_equals_direct_autograd():
    model, shape = build("conv2d")
    x = draw_input(model, shape).requires_grad_(True)
    y = torch.tensor([0, 2, 4])
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    g = torch.autograd.grad(losses.sum(), x, create_graph=True)[0]
    expected = losses + 0.5 * g.flatten(1).pow(2).sum(1)
    got = fallback.autograd_penalty(model, P.DoubleBackprop(y, 0.5), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


HEADS = {
    "squared-norm": lambda: P.JacobianFrobenius("logits"),
    "spectral": lambda: P.SpectralNorm("logits"),
    "relevance": lambda: P.Relevance(0, 0.4, 1.7),
    "alignment": lambda: P.Alignment(0),
    "gradient-norm": lambda: P.GradientNorm(0.5),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_q0_and_input_grad_are_gradients_of_p(name):
    """q_0 = ∇ξ p and input_grad = ∂p/∂x, as in docs/maths.md §5, checked by autograd on p."""
    head = HEADS[name]()
    torch.manual_seed(3)
    xi = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    gxi, gx = torch.autograd.grad(head.value(xi, x).sum(), (xi, x), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(head.q0(xi, x), gxi, rtol=1e-12, atol=1e-14)
    direct = head.input_grad(xi, x)
    torch.testing.assert_close(direct.sum(0) if direct is not None else torch.zeros_like(x), gx,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(3))
def test_softmax_eta_is_derivative_of_output_cotangent(seed):
    """(3.15): η_L = ∇z ⟨S(z) v, h⟩, general v and the e_i special case of docs/maths.md §4.11."""
    g = torch.Generator().manual_seed(seed)
    z, v, h = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    z.requires_grad_(True)
    expected = torch.autograd.grad((P.softmax_adjoint(torch.softmax(z, -1), v) * h).sum(), z)[0]
    x = torch.softmax(z, -1).detach()
    torch.testing.assert_close(P.softmax_eta(x, v, h), expected, rtol=1e-12, atol=1e-14)
    i = 2
    e = torch.zeros(7, dtype=torch.float64)
    e[i] = 1
    xh = (x * h).sum(-1, keepdim=True)
    special = x[:, i:i + 1] * ((h[:, i:i + 1] - xh) * e - x * h - (h[:, i:i + 1] - 2 * xh) * x)
    torch.testing.assert_close(P.softmax_eta(x, e.expand_as(x), h), special, rtol=1e-12, atol=1e-14)
