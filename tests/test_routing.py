"""Routing nodes, drop paths and forwards with optional arguments (issue 17 items 4, 9, 10): the routing cases
of tests/test_node_kinds.py run without opaque nodes; routing across the batch is refused; train-mode stochastic
depth equals autograd double backprop with the same masks; optional ``forward`` arguments take their defaults."""
import pytest
import torch
from torch import nn

import dbprop
from dbprop import fallback
from dbprop import functional as Fn
from dbprop import nodes
from dbprop import penalties as P
from dbprop.errors import UnsupportedModelError

from helpers import compare
from standins import DropPath, StochasticDepth
from test_node_kinds import BACKENDS, CASES, _build

ROUTING = [(kind, name) for kind in (nodes.Route, nodes.AdaptiveMaxPool, nodes.DropPath) for name in CASES[kind]]


@pytest.mark.parametrize("kind,name", ROUTING, ids=[f"{k.__name__}-{n}" for k, n in ROUTING])
def test_routing_cases_have_no_opaque_nodes(kind, name):
    model, _ = _build(kind, name, "cpu")
    program = dbprop.compile_model(model)
    assert not program.opaque_nodes, program.explain()


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc, self.fn = nn.Linear(3, 3), fn

    def forward(self, x):
        return self.fn(torch.tanh(self.fc(x)))


BATCH_ROUTES = {
    "slice-dim0": lambda y: y[1:],
    "int-dim0": lambda y: y[0].unsqueeze(0).expand(3, -1) * 1.0,
    "transpose-batch": lambda y: y.transpose(0, 1),   # (3, 3) -> (3, 3): same shape, samples mixed
    "t": lambda y: y.t(),
    "permute-batch": lambda y: y.unsqueeze(2).permute(1, 0, 2).squeeze(2),
    "list-dim0": lambda y: y[[2, 0, 1]],
    "view-batch": lambda y: y.view(-1)[:3].unsqueeze(1),
    "repeated": lambda y: y[:, [0, 0, 1]],
}


@pytest.mark.parametrize("what", list(BATCH_ROUTES))
def test_routing_across_the_batch_is_refused(what):
    torch.manual_seed(0)
    model = Lambda(BATCH_ROUTES[what]).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="batch|samples|twice|does not reproduce"):
        Fn.jacobian_penalty(model, x, backend="python", strict=True)


class DropBlock(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(5, 5), nn.Linear(5, 3), drop

    def forward(self, x):
        return self.fc2(x + self.drop(torch.tanh(self.fc1(x))))


DROPS = {"torchvision-row": lambda: StochasticDepth(0.5, "row"),
         "torchvision-batch": lambda: StochasticDepth(0.5, "batch"),
         "timm": lambda: DropPath(0.4), "timm-unscaled": lambda: DropPath(0.4, scale_by_keep=False),
         "timm-p1": lambda: DropPath(1.0)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drop", list(DROPS))
def test_train_mode_drop_path_matches_autograd(drop, backend):
    """The mask is drawn as the module draws it, so with the same seed both sides drop the same samples."""
    torch.manual_seed(3)
    model = DropBlock(DROPS[drop]()).double().train()
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    program = dbprop.compile_model(model)
    assert any(type(op) is nodes.DropPath for op in program.ops) and not program.opaque_nodes
    head = P.JacobianFrobenius("softmax")
    value, ref, err = compare(model, x, lambda: Fn.jacobian_penalty(model, x, output="softmax", backend=backend,
                                                                    strict=True), head)
    assert err < 1e-9
    eval_value = fallback.autograd_penalty(model.eval(), head, x).mean()
    assert not torch.allclose(eval_value, ref)  # train mode is not the identity: the masks matter


def test_drop_path_bad_mode_is_refused():
    model = DropBlock(StochasticDepth(0.5, "rows")).double().train()
    with pytest.raises((ValueError, UnsupportedModelError), match="mode"):
        Fn.jacobian_penalty(model, torch.randn(4, 5, dtype=torch.float64), backend="python", strict=True)


class Optional3(nn.Module):
    """timm's ``forward(self, x, attn_mask=None, is_causal=False)`` shape of signature."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(3, 3)

    def forward(self, x, attn_mask=None, is_causal=False, pieces: int = 2):
        y = torch.tanh(self.fc1(x))
        if attn_mask is not None:
            y = y + attn_mask
        a, b = y.chunk(pieces, dim=1)
        return self.fc2(a if is_causal else a + torch.sigmoid(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_optional_arguments_uses_their_defaults(backend):
    torch.manual_seed(2)
    model = Optional3().double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    program = dbprop.compile_model(model)
    assert not program.opaque_nodes and len([n for n in program.ir.steps[0].node.graph.nodes
                                             if n.op == "placeholder"]) == 1
    head = P.JacobianFrobenius("softmax")
    _, _, err = compare(model, x, lambda: Fn.jacobian_penalty(model, x, output="softmax", backend=backend,
                                                              strict=True), head)
    assert err < 1e-9


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y, scale=1.0):
        return self.fc(x) + y


def test_forward_with_a_required_second_argument_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"TwoInputs.forward also takes y without a default"):
        dbprop.compile_model(TwoInputs())


def test_adaptive_max_pool_returning_indices_is_refused():
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.AdaptiveMaxPool1d(2, return_indices=True))
    with pytest.raises(UnsupportedModelError, match="returns indices"):
        dbprop.compile_model(model)
