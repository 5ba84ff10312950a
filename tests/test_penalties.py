"""Every penalty x output x small net: value and all gradients (parameters and x) equal autograd double
backprop in float64 to relative 1e-9."""
import pytest
import torch

import dbprop
from dbprop import functional as F
from dbprop import penalties as P

from helpers import compare
from nets import NETS, build, draw_input

TOL = 1e-9
B = 3


def _labels(C):
    return torch.tensor([1, 0, C - 1])[:B]


# name -> (dbprop call(model, x, C, backend), reference head(C))
CASES = {
    "jacobian-logits": (lambda m, x, C, b: F.jacobian_penalty(m, x, backend=b),
                        lambda C: P.JacobianFrobenius("logits")),
    "jacobian-softmax": (lambda m, x, C, b: F.jacobian_penalty(m, x, output="softmax", backend=b),
                         lambda C: P.JacobianFrobenius("softmax")),
    "jacobian-softmax-chunk2": (lambda m, x, C, b: F.jacobian_penalty(m, x, output="softmax", chunk_size=2,
                                                                      backend=b),
                                lambda C: P.JacobianFrobenius("softmax")),
    "jacobian-logits-chunk1": (lambda m, x, C, b: F.jacobian_penalty(m, x, chunk_size=1, backend=b),
                               lambda C: P.JacobianFrobenius("logits")),
    "random-logits": (lambda m, x, C, b: F.jacobian_penalty(m, x, estimator="random", num_projections=3,
                                                            chunk_size=2, backend=b),
                      lambda C: P.JacobianFrobenius("logits", "random", 3)),
    "random-softmax": (lambda m, x, C, b: F.jacobian_penalty(m, x, output="softmax", estimator="random",
                                                             num_projections=2, backend=b),
                       lambda C: P.JacobianFrobenius("softmax", "random", 2)),
    "output-gradient-logits": (lambda m, x, C, b: F.output_gradient_penalty(m, x, _labels(C), backend=b),
                               lambda C: P.OutputGradient("logits", _labels(C))),
    "output-gradient-softmax": (lambda m, x, C, b: F.output_gradient_penalty(m, x, 1, output="softmax", backend=b),
                                lambda C: P.OutputGradient("softmax", 1)),
    "double-backprop-ce": (lambda m, x, C, b: F.double_backprop_loss(m, x, _labels(C), weight=0.7, backend=b),
                           lambda C: P.DoubleBackprop(_labels(C), 0.7)),
    "double-backprop-mse": (lambda m, x, C, b: F.double_backprop_loss(m, x, _targets(C), weight=1.3, loss="mse",
                                                                      backend=b),
                            lambda C: P.DoubleBackprop(_targets(C), 1.3, "mse")),
    "spectral-logits": (lambda m, x, C, b: F.spectral_norm_penalty(m, x, power_iterations=3, backend=b),
                        lambda C: P.SpectralNorm("logits", 3)),
    "spectral-softmax": (lambda m, x, C, b: F.spectral_norm_penalty(m, x, output="softmax", backend=b),
                         lambda C: P.SpectralNorm("softmax", 1)),
    "relevance": (lambda m, x, C, b: F.relevance_penalty(m, x, _labels(C), l1=0.3, l2=0.8, backend=b),
                  lambda C: P.Relevance(_labels(C), 0.3, 0.8)),
    "alignment": (lambda m, x, C, b: F.alignment_penalty(m, x, _labels(C), backend=b),
                  lambda C: P.Alignment(_labels(C))),
}
BACKENDS = ["python"] + (["native"] if dbprop.native_available() else [])


def _targets(C):
    return torch.linspace(-1, 1, B * C, dtype=torch.float64).reshape(B, C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_autograd(net, case, backend):
    model, shape = build(net)
    x = draw_input(model, shape, B).requires_grad_(True)
    C = model(x).shape[1]
    call, head = CASES[case]
    value, ref, err = compare(model, x, lambda: call(model, x, C, backend), head(C))
    assert torch.isfinite(value) and value.abs() > 0
    assert err <= TOL, f"{case} on {net}: relative error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("center", [0.0, 1.0])
def test_gradient_penalty_matches_autograd(center, backend):
    model, shape = build("critic")
    x = draw_input(model, shape, 4).requires_grad_(True)
    value, ref, err = compare(model, x, lambda: F.gradient_penalty(model, x, center=center, backend=backend),
                              P.GradientNorm(center))
    assert err <= TOL


def test_gradient_penalty_needs_scalar_critic():
    model, shape = build("mlp")
    with pytest.raises(ValueError, match="scalar critic"):
        dbprop.GradientPenalty(model)(draw_input(model, shape))


ABSTRACT_HEADS = {P.Penalty, P.SquaredNorm, P._LabelledLogits}
#: heads whose case lives in its own test above (scalar critics only)
OWN_TESTS = {P.GradientNorm: test_gradient_penalty_matches_autograd}


def test_every_head_has_a_case():
    heads, todo = set(), [P.Penalty]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ == P.__name__:  # not the heads tests define for themselves
            heads.add(cls)
    covered = {type(head(3)) for _, head in CASES.values()} | set(OWN_TESTS)
    assert heads - ABSTRACT_HEADS <= covered, f"penalty heads without a case: {heads - ABSTRACT_HEADS - covered}"
