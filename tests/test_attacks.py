"""dbprop.analysis.empirical_robustness: foolbox's attacks find ρ = ρ̃ on linear models, and bad input is refused."""
import math
import sys

import pytest
import torch
from torch import nn

from dbprop import analysis as A

from nets import build, draw_input

fb = pytest.importorskip("foolbox")
WIDE = (-5.0, 6.0)   # bounds that never clip (x in [0, 1]), so the minimal perturbation of a linear model is ρ̃


def _linear(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes)).double()


def _x(batch=10, seed=1):
    return torch.rand(batch, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_gradient_line_search_is_exact_on_a_grid_for_linear_models():
    """Two classes: the loss gradient points along ḡ† = ∇(Ψ^{i*} − Ψ^j), so the line search stops at the
    smallest radius ε_k ≥ ρ̃ and the adversarial is exactly ε_k away."""
    model, x = _linear(), _x()
    rho_lin, _ = A.linearized_robustness(model, x)
    grid = torch.logspace(-2, 2, 97, dtype=torch.float64)
    rho = A.empirical_robustness(model, x, "gradient", bounds=WIDE, epsilons=grid.tolist())
    expected = torch.stack([grid[grid >= r].min() for r in rho_lin])
    torch.testing.assert_close(rho, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("attack, bounds, tolerance", [
    ("gradient", WIDE, 1.04), ("bim", WIDE, 1.04),
    ("cw", (-0.5, 1.5), 1.25),   # the light default: a few Adam steps, coarse where ρ̃ is small against the box
    (fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=500, stepsize=0.005, initial_const=1), WIDE, 1.04)])
def test_attacks_find_the_linear_distance(attack, bounds, tolerance):
    """No adversarial is closer than ρ̃ (exact for linear models); each attack gets within its resolution."""
    model, x = _linear(), _x()
    rho_lin, _ = A.linearized_robustness(model, x)
    rho = A.empirical_robustness(model, x, attack, bounds=bounds)
    assert (rho >= rho_lin * (1 - 1e-9)).all()
    assert (rho <= rho_lin * tolerance).all(), (rho / rho_lin).max()


def test_several_attacks_give_the_per_sample_minimum_and_restore_the_mode():
    model, shape = build("mlp")
    x = draw_input(model, shape, 6).clamp(-5, 6)
    model.train()
    each = [A.empirical_robustness(model, x, a, bounds=WIDE) for a in ("gradient", "cw")]
    both = A.empirical_robustness(model, x, ["gradient", A.make_attack("cw")], bounds=WIDE)
    assert model.training
    torch.testing.assert_close(both, torch.minimum(*each))
    assert torch.isfinite(both).all() and (both > 0).all()


def test_misclassified_samples_are_at_distance_zero():
    model, x = _linear(3), _x()
    predicted = model(x).argmax(1)
    labels = predicted.clone()
    labels[:3] = (labels[:3] + 1) % 3
    rho = A.empirical_robustness(model, x, "gradient", labels=labels, bounds=WIDE)
    assert (rho[:3] == 0).all() and (rho[3:] > 0).all()


def test_bad_input_is_refused():
    model, x = _linear(), _x()
    with pytest.raises(ValueError, match="unknown attack"):
        A.empirical_robustness(model, x, "deepfool")
    with pytest.raises(TypeError, match="not a foolbox L2 attack"):
        A.empirical_robustness(model, x, fb.attacks.LinfFastGradientAttack())
    with pytest.raises(ValueError, match="outside bounds"):
        A.empirical_robustness(model, x + 1)
    with pytest.raises(ValueError, match="non-finite"):
        A.empirical_robustness(model, x.clone().fill_(math.nan))
    with pytest.raises(ValueError, match="labels"):
        A.empirical_robustness(model, x, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        A.empirical_robustness(model, x, labels=torch.full((10,), 2))
    with pytest.raises(ValueError, match="logits of shape"):
        A.empirical_robustness(nn.Sequential(nn.Flatten(), nn.Linear(12, 1)).double(), x)
    with pytest.raises(ValueError, match="increasing"):
        A.empirical_robustness(model, x, epsilons=[1.0, 0.5])
    with pytest.raises(ValueError, match="bounds"):
        A.empirical_robustness(model, x, bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="empty batch"):
        A.empirical_robustness(model, x[:0])


def test_missing_foolbox_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "foolbox", None)
    with pytest.raises(ImportError, match=r"dbprop\[robustness\]"):
        A.empirical_robustness(_linear(), _x())
