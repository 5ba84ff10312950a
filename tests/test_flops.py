"""FLOPs of the exact Jacobian penalty (counted by a TorchDispatchMode with torch.utils.flop_counter's formulas)
equal the analytic count of docs/maths.md §8.1 and are strictly below autograd double backprop's."""
import pytest
import torch

from dbprop import fallback
from dbprop import functional as F
from dbprop import penalties as P
from dbprop.analysis.flops import count_flops, jacobian_penalty_flops, layer_costs
from dbprop.demo import thesis_network

from nets import build, draw_input


def _nets():
    """Each model after one penalty call (its program's one-time self-check runs a forward pass)."""
    for name, model, x in _raw_nets():
        F.jacobian_penalty(model, x)
        yield name, model, x


def _raw_nets():
    model, shape = build("conv2d", dtype=torch.float32)
    yield "conv2d", model, draw_input(model, shape, batch=4, dtype=torch.float32)
    torch.manual_seed(0)
    demo = thesis_network().eval()
    yield "thesis", demo, torch.randn(8, 1, 8, 8)


@pytest.mark.parametrize("output", ["logits", "softmax"])
def test_counted_equals_analytic_and_beats_autograd(output):
    for name, model, x in _nets():
        C = model(x).shape[1]
        counted = count_flops(lambda: F.jacobian_penalty(model, x, output=output).backward())
        analytic = jacobian_penalty_flops(layer_costs(model, x), C, output)["dbprop"]
        assert counted == analytic, name
        autograd = count_flops(lambda: fallback.autograd_penalty(model, P.JacobianFrobenius(output), x)
                               .mean().backward())
        assert counted < autograd, (name, counted, autograd)


def test_chunking_does_not_change_flops():
    name, model, x = next(_nets())
    counts = {k: count_flops(lambda: F.jacobian_penalty(model, x, output="softmax", chunk_size=k).backward())
              for k in (1, 2, 5)}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("L,C", [(3, 10), (5, 7), (8, 1)])
def test_unit_cost_counts(L, C):
    """With unit costs: 3CL + L − C (logits), 3CL + 3L − 1 (softmax), naive 5CL + L − C."""
    logits = jacobian_penalty_flops([1] * L, C, "logits")
    softmax = jacobian_penalty_flops([1] * L, C, "softmax")
    assert logits["dbprop"] == 3 * C * L + L - C
    assert softmax["dbprop"] == 3 * C * L + 3 * L - 1
    assert logits["naive"] == 5 * C * L + L - C


def test_logits_penalty_runs_no_forward_backward_pass():
    """η ≡ 0 for logits: no transposed op beyond the per-class backward passes."""
    name, model, x = next(_nets())
    C = model(x).shape[1]
    costs = layer_costs(model, x)
    counted = count_flops(lambda: F.jacobian_penalty(model, x).backward())
    assert counted == sum(costs) + C * (3 * sum(costs) - costs[-1])
