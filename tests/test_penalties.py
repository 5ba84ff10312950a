"""The penalty registry (tests/penalty_cases.py) against autograd double backprop in float64 to relative 1e-9:
every case's function on every small net, its module at every reduction, on every backend and device; the
meta-test fails for a public penalty function, module or head without a case."""
import inspect

import pytest
import torch

import dbprop
from dbprop import functional as F
from dbprop import modules as M
from dbprop import penalties as P

from helpers import BACKENDS, DEVICES, compare
from nets import build, draw_input
from penalty_cases import CASES

TOL = 1e-9
B = 3
NET_PARAMS = [(case, net) for case in sorted(CASES) for net in CASES[case].nets]
#: per-sample weights of the reduction="none" check: unequal, one negative
WEIGHTS = [0.3, -1.0, 2.0]


def _setup(case, net, device, batch=B):
    model, shape = build(net)
    model = model.to(device)
    x = draw_input(model, shape, batch).to(device).requires_grad_(True)
    C = model(x).shape[1]
    return model, x, CASES[case].label_args(batch, C, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,net", NET_PARAMS)
def test_function_matches_autograd(case, net, backend, device):
    model, x, args = _setup(case, net, device)
    c = CASES[case]
    value, ref, err = compare(model, x, lambda: c.function(model, x, *args, **c.options, backend=backend),
                              c.reference(args))
    assert torch.isfinite(value) and value.abs() > 0
    assert err <= TOL, f"{case} on {net}: relative error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_module_matches_autograd_for_every_reduction(case, reduction, backend, device):
    """The module form (which builds its head from its options) on the MLP (the critic for scalar-critic
    penalties); reduction="none" through unequal per-sample weights."""
    c = CASES[case]
    net = "mlp" if "mlp" in c.nets else c.nets[0]
    model, x, args = _setup(case, net, device)
    pen = c.module(model, **c.options, reduction=reduction, backend=backend)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64, device=device) if reduction == "none" else None
    value, ref, err = compare(model, x, lambda: pen(x, *args), c.reference(args), reduction=reduction, weights=weights)
    assert value.shape == ref.shape and value.device == x.device
    assert err <= TOL, f"{case}, reduction={reduction}: relative error {err:.3g}"


def test_gradient_penalty_needs_scalar_critic():
    model, shape = build("mlp")
    with pytest.raises(ValueError, match="scalar critic"):
        dbprop.GradientPenalty(model)(draw_input(model, shape))


ABSTRACT_HEADS = {P.Penalty, P.SquaredNorm, P._LabelledLogits}


def test_every_penalty_has_a_case():
    """Every head class of dbprop/penalties.py, every public function of dbprop.functional and every penalty
    module of dbprop/modules.py is some case's reference head, function or module."""
    heads, todo = set(), [P.Penalty]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ == P.__name__:  # not the heads tests define for themselves
            heads.add(cls)
    covered = {type(c.reference(c.label_args(B, 3, "cpu"))) for c in CASES.values()}
    assert heads - ABSTRACT_HEADS <= covered, f"penalty heads without a case: {heads - ABSTRACT_HEADS - covered}"
    functions = {getattr(F, name) for name in F.__all__}
    missing = functions - {c.function for c in CASES.values()}
    assert not missing, f"penalty functions without a case: {sorted(f.__name__ for f in missing)}"
    modules = {cls for _, cls in inspect.getmembers(M, inspect.isclass)
               if issubclass(cls, M.PenaltyModule) and cls is not M.PenaltyModule and cls.__module__ == M.__name__}
    missing = modules - {c.module for c in CASES.values()}
    assert not missing, f"penalty modules without a case: {sorted(m.__name__ for m in missing)}"
