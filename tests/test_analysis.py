"""dbprop.analysis: the identities and bounds of Etmann et al. (ICML 2019) pointwise on random ReLU nets."""
import pytest
import torch
from torch import nn

import dbprop
from dbprop import analysis as A

from helpers import bias_terms, saliencies
from nets import build, draw_input

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)


def _bias_free(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 8, bias=False), nn.LeakyReLU(0.1), nn.Linear(8, 5, bias=False)).double()


def _jacobian(model, x):
    return torch.func.vmap(torch.func.jacrev(lambda xb: model(xb[None])[0]))(x)  # (B, C, ...)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", ["conv2d", "mlp", "conv1d"])
def test_input_gradients_and_saliency_equal_autograd(net, backend):
    model, shape = build(net)
    x = draw_input(model, shape, 4)
    logits, G = A.logits_and_input_gradients(model, x, backend=backend)
    J = _jacobian(model, x)
    torch.testing.assert_close(G, J.transpose(0, 1), rtol=1e-12, atol=1e-14)
    b = torch.arange(4)
    torch.testing.assert_close(A.saliency(model, x, backend=backend), J[b, logits.argmax(1)], rtol=1e-12, atol=1e-14)
    t = torch.tensor([1, 0, 2, 1])
    torch.testing.assert_close(A.saliency(model, x, target=t, backend=backend), J[b, t], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_free_identities(backend):
    """ρ̃ = α† and Ψ^i = ⟨x, ∇Ψ^i⟩ (β = 0) for bias-free ReLU nets."""
    model = _bias_free()
    x = draw_input(model, (2, 8, 8), 6)
    rho, _ = A.linearized_robustness(model, x, backend=backend)
    torch.testing.assert_close(rho, A.binarized_alignment(model, x, backend=backend), rtol=1e-10, atol=1e-12)
    x_terms, beta = A.homogeneous_decomposition(model, x, backend=backend)
    torch.testing.assert_close(x_terms, model(x), rtol=1e-12, atol=1e-12)
    assert beta.abs().max() < 1e-12


@pytest.mark.parametrize("net", ["conv2d", "conv2d_options", "mlp"])
def test_bound_and_theorem1_with_biases(net):
    """ρ̃ ≤ α† + |β†|/‖g†‖, and β^i = Σ_j ⟨b_j, ∇_{b_j}Ψ^i⟩ with the explicit bias gradients Σ ζ_j."""
    model, shape = build(net)
    x = draw_input(model, shape, 5)
    logits, G = A.logits_and_input_gradients(model, x)
    rho, j_star = A.linearized_robustness(model, x)
    alpha_dagger = A.binarized_alignment(model, x)
    x_terms, beta = A.homogeneous_decomposition(model, x)
    b = torch.arange(5)
    i_star = logits.argmax(1)
    g_dagger = (G[i_star, b] - G[j_star, b]).flatten(1)
    beta_dagger = beta[b, i_star] - beta[b, j_star]
    assert torch.all(rho <= alpha_dagger + beta_dagger.abs() / g_dagger.norm(dim=1) + 1e-12)
    # Theorem 1 with explicit bias gradients from the backward pass
    program, out, _, cotangents = saliencies(model, x)
    torch.testing.assert_close(beta, bias_terms(program, cotangents, *out.shape, x.dtype), rtol=1e-10, atol=1e-12)


def test_linear_model_robustness_is_exact():
    """For a linear model ρ = ρ̃ = α†: bisection along −ḡ† finds the decision boundary at distance ρ̃."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 4, bias=False)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    rho, j_star = A.linearized_robustness(model, x)
    torch.testing.assert_close(rho, A.binarized_alignment(model, x), rtol=1e-12, atol=1e-14)
    logits, G = A.logits_and_input_gradients(model, x)
    b = torch.arange(5)
    i_star = logits.argmax(1)
    g = G[i_star, b] - G[j_star, b]
    direction = -g / g.norm(dim=1, keepdim=True)
    lo, hi = torch.zeros(5, dtype=torch.float64), 10 * rho + 1
    for _ in range(200):  # smallest t along −ḡ† where the prediction changes
        mid = (lo + hi) / 2
        flipped = model(x + mid[:, None] * direction).argmax(1) != i_star
        hi, lo = torch.where(flipped, mid, hi), torch.where(flipped, lo, mid)
    torch.testing.assert_close(hi, rho, rtol=1e-9, atol=1e-12)


def test_alignment_definition_and_unsupported_model():
    model, shape = build("conv2d")
    x = draw_input(model, shape, 4)
    g = A.saliency(model, x).flatten(1)
    expected = (x.flatten(1) * g).sum(1).abs() / g.norm(dim=1)
    torch.testing.assert_close(A.alignment(model, x), expected)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    torch.testing.assert_close(A.alignment(Custom(), x), expected)


def test_against_captum():
    attr = pytest.importorskip("captum.attr")
    model, shape = build("conv2d")
    x = draw_input(model, shape, 4)
    t = torch.tensor([0, 1, 2, 3])
    ours = A.saliency(model, x, target=t)
    x_ = x.clone().requires_grad_()
    theirs = attr.Saliency(model).attribute(x_, target=t, abs=False)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x * ours, attr.InputXGradient(model).attribute(x_, target=t).detach())
