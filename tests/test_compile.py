"""torch.compile: a training step with a dbprop penalty compiles whole (fullgraph=True) with the penalty as one
opaque operator (dbprop/ops.py), and its gradients match eager; opcheck on the operators."""
import pytest
import torch
import torch.nn as nn

import dbprop
from dbprop import ops

from helpers import assert_grads_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()


def _critic(seed=0):
    return nn.Sequential(_net(seed), nn.Tanh(), nn.Linear(5, 1)).double()


def _sn_critic(seed=0):
    """An SN-GAN critic: spectral_norm parametrizations (a power-iteration step per forward in train mode)."""
    torch.manual_seed(seed)
    sn = nn.utils.parametrizations.spectral_norm
    return nn.Sequential(sn(nn.Conv2d(3, 4, 3, stride=2)), nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.Linear(36, 1))).double()


X = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3])

PENALTIES = {  # name -> (model factory, penalty factory, call)
    "jacobian": (_net, lambda m: dbprop.JacobianPenalty(m, output="softmax"), lambda p, x, y: p(x)),
    "jacobian-random": (_net, lambda m: dbprop.JacobianPenalty(m, estimator="random", num_projections=2),
                        lambda p, x, y: p(x)),
    "output-gradient": (_net, lambda m: dbprop.OutputGradientPenalty(m), lambda p, x, y: p(x, 2)),
    "double-backprop": (_net, lambda m: dbprop.DoubleBackpropLoss(m, 0.5), lambda p, x, y: p(x, y)),
    "spectral": (_net, lambda m: dbprop.SpectralNormPenalty(m, output="softmax"), lambda p, x, y: p(x)),
    "relevance": (_net, lambda m: dbprop.RelevancePenalty(m, l1=0.1, l2=1.0), lambda p, x, y: p(x, y)),
    "alignment": (_net, lambda m: dbprop.AlignmentPenalty(m), lambda p, x, y: p(x, y)),
    "gradient-penalty": (_critic, lambda m: dbprop.GradientPenalty(m), lambda p, x, y: p(x)),
    "gradient-penalty-spectral-norm": (_sn_critic, lambda m: dbprop.GradientPenalty(m), lambda p, x, y: p(x)),
}


def _step(model, pen, call, name):
    def step(x, y):
        if name == "double-backprop":  # it replaces the task loss (and the task forward)
            return call(pen, x, y)
        task = model(x).pow(2).mean() if name.startswith("gradient-penalty") else nn.functional.cross_entropy(model(x), y)
        return task + 0.3 * call(pen, x, y)
    return step


def _run(step, model, x, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # random projections / power iterations draw the same directions
    x = x.clone().requires_grad_(True)
    loss = step(x, Y)
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_compiled_fullgraph_step_matches_eager(name):
    make_model, make_pen, call = PENALTIES[name]
    model = make_model()
    pen = make_pen(model)
    step = _step(model, pen, call, name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_loss, eager_grads, eager_buffers = _run(step, model, X)
    model.load_state_dict(state)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grads, buffers = _run(compiled, model, X)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=0)
    assert_grads_close(grads, eager_grads)
    for a, b in zip(buffers, eager_buffers):  # running statistics: the task forward (+ double backprop's)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_compiled_with_inductor_matches_eager():
    model = _net()
    pen = dbprop.JacobianPenalty(model, output="softmax")
    step = _step(model, pen, PENALTIES["jacobian"][2], "jacobian")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = _run(step, model, X)
    model.load_state_dict(state)
    torch._dynamo.reset()
    got = _run(torch.compile(step, fullgraph=True), model, X)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-12, atol=0)
    assert_grads_close(got[1], eager[1])


@pytest.mark.parametrize("make_model", [_net, _sn_critic])
def test_compiled_reduction_none_with_weights_is_exact(make_model):
    """The backward recomputes with the per-sample weights, from the buffers as the forward call left them."""
    model = make_model()
    pen = dbprop.JacobianPenalty(model, output="softmax", reduction="none")
    w = torch.rand(4, dtype=torch.float64)

    def step(x, y):
        return (pen(x) * w).sum() + model(x).pow(2).mean()  # the task forward after it moves the state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = _run(step, model, X)
    model.load_state_dict(state)
    torch._dynamo.reset()
    got = _run(torch.compile(step, fullgraph=True, backend="aot_eager"), model, X)
    assert_grads_close(got[1], eager[1])


def _op_args(pen, model, labels=None):
    params = list(model.parameters())
    buffers = list(model.buffers())
    return (X.clone(), params, labels, buffers, pen._handle, [True] * len(params), True)


@pytest.mark.parametrize("name", ["jacobian", "double-backprop", "alignment"])
def test_opcheck_penalty_operator(name):
    make_model, make_pen, _ = PENALTIES[name]
    model = make_model().eval()  # eval: repeated calls give identical results (no statistics update)
    pen = make_pen(model)
    labels = None if name == "jacobian" else Y
    torch.library.opcheck(torch.ops.dbprop.penalty.default, _op_args(pen, model, labels))


def test_opcheck_penalty_grads_operator():
    model = _net().eval()
    pen = dbprop.JacobianPenalty(model, reduction="none")
    params = [p.detach() for p in model.parameters()]  # only ever called inside a backward: no graph
    buffers = [b.clone() for b in model.buffers()]
    args = (X.clone(), params, None, buffers, torch.rand(4, dtype=torch.float64), pen._handle, [True] * len(params),
            True)
    torch.library.opcheck(torch.ops.dbprop.penalty_grads.default, args)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        x = X.clone().requires_grad_(True)
        gx, _ = torch.ops.dbprop.penalty_grads(x, params, None, buffers, torch.rand(4, dtype=torch.float64),
                                               pen._handle, [True] * len(params), True)
        gx.sum().backward()


def test_operator_of_a_deleted_module_raises():
    model = _net()
    handle = dbprop.JacobianPenalty(model)._handle
    import gc
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        ops._module(handle)
