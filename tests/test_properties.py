"""gradcheck of the autograd Function for every penalty, and the homogeneity identities of docs/maths.md §7."""
import pytest
import torch
from torch import nn

from dbprop import functional as F

from helpers import bias_terms, deterministic_algorithms, saliencies
from nets import build, draw_input

LABELS = torch.tensor([0, 2])
GRADCHECK_CASES = {
    "jacobian-logits": lambda m, x: F.jacobian_penalty(m, x),
    "jacobian-softmax": lambda m, x: F.jacobian_penalty(m, x, output="softmax", chunk_size=2),
    "random-softmax": lambda m, x: F.jacobian_penalty(m, x, output="softmax", estimator="random", num_projections=2),
    "output-gradient": lambda m, x: F.output_gradient_penalty(m, x, LABELS, output="softmax"),
    "double-backprop-ce": lambda m, x: F.double_backprop_loss(m, x, LABELS, 0.5),
    "double-backprop-mse": lambda m, x: F.double_backprop_loss(m, x, torch.ones(2, 3, dtype=torch.float64), 0.5,
                                                             loss="mse"),
    # at the converged singular vector dv/dθ does not change R (envelope theorem): "v held constant" is exact
    "spectral": lambda m, x: F.spectral_norm_penalty(m, x, output="softmax", power_iterations=60),
    "relevance": lambda m, x: F.relevance_penalty(m, x, LABELS, l1=0.1, l2=1.0),
    "alignment": lambda m, x: F.alignment_penalty(m, x, LABELS),
    "none-reduction": lambda m, x: F.jacobian_penalty(m, x, output="softmax", reduction="none"),
}


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        m, shape = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4), nn.LeakyReLU(0.2), nn.Linear(4, 3)), (4,)
    else:
        m, shape = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(8, 3)), (1, 4, 4)
    m = m.double()
    return m, draw_input(m, shape, batch=2)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck(kind, case):
    model, x = _tiny(kind)
    x.requires_grad_(True)
    call = GRADCHECK_CASES[case]

    def f(x, *params):  # params are the model's own tensors: gradcheck perturbs them in place
        torch.manual_seed(0)  # the same random directions / dropout masks in every evaluation
        return call(model, x)

    # gradcheck's reentrancy check wants bit-identical repeats: deterministic mode fixes the chunk sizes
    # (no timing-based choice, dbprop/tuning.py)
    with deterministic_algorithms():
        assert torch.autograd.gradcheck(f, (x, *model.parameters()), eps=1e-6, atol=1e-7, rtol=1e-5)


def _bias_free(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, bias=False), nn.LeakyReLU(0.1), nn.Flatten(),
                         nn.Linear(16, 5, bias=False)).double()


_saliencies = saliencies


def test_euler_identity_bias_free():
    """Ψ_i(x) = ⟨x, ∇x Ψ_i(x)⟩ and Ψ(ax) = aΨ(x) for bias-free ReLU nets."""
    model = _bias_free()
    x = draw_input(model, (2, 8, 8), batch=4)
    _, out, xi, _ = _saliencies(model, x)
    torch.testing.assert_close((x[None] * xi).flatten(2).sum(-1).T, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(2.5 * x), 2.5 * model(x), rtol=1e-12, atol=1e-12)


def test_theorem1_with_biases():
    """Ψ_i(x) = ⟨x, ∇xΨ_i⟩ + Σ_j ⟨b_j, ∇_{b_j}Ψ_i⟩ with ∇_{b_j}Ψ_i = Σ ζ_j from the dbprop backward pass."""
    model, shape = build("conv2d")
    x = draw_input(model, shape, batch=4)
    program, out, xi, cotangents = _saliencies(model, x)
    total = (x[None] * xi).flatten(2).sum(-1).T + bias_terms(program, cotangents, *out.shape, x.dtype)
    torch.testing.assert_close(total, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("penalty", ["jacobian", "output-gradient"])
def test_penalty_homogeneity_identities(penalty):
    """Bias-free logits penalties R = ‖J‖² are homogeneous of degree 2 in each layer's weights and of degree 0
    in x: ⟨θ_j, ∇θ_j R⟩ = 2R for every layer j, ⟨x, ∇x R⟩ = 0 and R(ax) = R(x): gradients checked without autograd."""
    model = _bias_free(1)
    x = draw_input(model, (2, 8, 8), batch=3).requires_grad_(True)
    call = (lambda x: F.jacobian_penalty(model, x)) if penalty == "jacobian" else \
        (lambda x: F.output_gradient_penalty(model, x, torch.tensor([0, 3, 4])))
    R = call(x)
    grads = torch.autograd.grad(R, [x, *model.parameters()])
    for w, g in zip(model.parameters(), grads[1:]):
        torch.testing.assert_close((w * g).sum(), 2 * R, rtol=1e-10, atol=0)
    assert (x * grads[0]).sum().abs() < 1e-12
    torch.testing.assert_close(call(3.0 * x.detach()), R.detach(), rtol=1e-12, atol=0)


def test_softmax_penalty_is_not_scale_invariant():
    """Softmax Jacobian penalty is not scale invariant: R(ax) ≠ R(x) in general (a sanity check that the
    identity above is not trivially satisfied)."""
    model = _bias_free(2)
    x = draw_input(model, (2, 8, 8), batch=3)
    a, b = F.jacobian_penalty(model, x, output="softmax"), F.jacobian_penalty(model, 3.0 * x, output="softmax")
    assert not torch.allclose(a, b)
