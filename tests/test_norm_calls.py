"""Norm layers beyond the registry cases (tests/test_node_kinds.py): BatchNorm subclasses with their own forward
(timm's BatchNormAct2d: F.batch_norm with the module's buffers, then drop and activation), traced into and run as
BatchNorm nodes in train and eval mode with nn.BatchNorm's running-statistics semantics; the functional forms
F.layer_norm / F.group_norm / F.instance_norm; InstanceNorm with running statistics; refusals. float64 against
reverse-over-reverse autograd, gradients compared on the scale of the whole gradient."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbprop
from dbprop import UnsupportedModelError, fallback, nodes
from dbprop import functional as Fn
from dbprop import penalties as P

from helpers import assert_grads_close, grads_of

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, written out (timm is not a dependency): nn.BatchNorm2d's own forward, then drop and
    activation."""

    def __init__(self, num_features, act=True, **kw):
        super().__init__(num_features, **kw)
        self.drop = nn.Identity()
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        return self.act(self.drop(x))


class Net(nn.Module):
    def __init__(self, **bn):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = BatchNormAct2d(3, **bn)
        self.fc = nn.Linear(3 * 4 * 3, 3)

    def forward(self, x):
        return self.fc(self.bn1(self.conv(x)).flatten(1))


def _net(train, **bn):
    torch.manual_seed(2)
    model = Net(**bn).double()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
        if model.bn1.track_running_stats:
            model.bn1.running_mean.uniform_(-0.3, 0.3)
            model.bn1.running_var.uniform_(0.5, 2.0)
    return model.train(train)


def _check(model, x, backend, output="softmax", rtol=1e-9):
    x = x.clone().requires_grad_(True)
    value = Fn.jacobian_penalty(model, x, output=output, backend=backend, strict=True)
    got = grads_of(value, model, x)
    ref = fallback.autograd_penalty(model, P.JacobianFrobenius(output), x).mean()
    want = grads_of(ref, model, x)
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    assert_grads_close(got, want, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_batchnorm_subclass_matches_autograd(backend, train, output):
    model = _net(train)
    before = [b.clone() for b in model.buffers()]
    program = dbprop.compile_model(model)
    assert [type(op).__name__ for op in program.ops] == ["Conv", "BatchNorm", "Identity", "SmoothActivation",
                                                                "Reshape", "Linear"]
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before)), "compiling leaves the buffers alone"
    x = torch.randn(4, 2, 4, 3, dtype=torch.float64)
    _check(model, x, backend, output)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before)), "penalties leave running stats"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_subclass_running_statistics_like_one_forward(backend, momentum):
    model = _net(True, momentum=momentum)
    reference = copy.deepcopy(model)
    x = torch.randn(5, 2, 4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    for _ in range(2):
        Fn.double_backprop_loss(model, x, y, 0.5, backend=backend, strict=True).backward()
        with torch.no_grad():
            reference(x)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    assert int(model.bn1.num_batches_tracked) == 2


def test_batchnorm_subclass_without_running_statistics():
    model = _net(True, track_running_stats=False)
    _check(model, torch.randn(4, 2, 4, 3, dtype=torch.float64), BACKENDS[-1])


class CallsWithOtherMode(nn.BatchNorm2d):
    """F.batch_norm with batch statistics in eval mode: not what the module's mode says, so not a BatchNorm node."""

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_batch_norm_that_disagrees_with_the_module_is_not_a_batchnorm_node(backend):
    """Not the module's BatchNorm: an opaque call whose parameters are parameter leaves (docs/maths.md §4.14),
    still exact."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), CallsWithOtherMode(3), nn.Flatten(), nn.Linear(12, 2)).double().eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    ops = dbprop.compile_model(model).ops
    assert not any(isinstance(op, nodes.BatchNorm) for op in ops)
    assert sum(isinstance(op, nodes.ParameterLeaf) for op in ops) == 2
    _check(model, torch.randn(4, 2, 2, 2, dtype=torch.float64), backend)


# ------------------------------------------------------------------------------ functional per-sample norms
class LayerNormLast(nn.LayerNorm):
    """A LayerNorm subclass with its own forward (F.layer_norm with the module's parameters, then GELU)."""

    def forward(self, x):
        return F.gelu(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))


class Functional(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(2, 4, 2)
        self.ln = LayerNormLast(3)
        self.fc = nn.Linear(4 * 4 * 3, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "layer_norm":
            h = F.layer_norm(h, (4, 3), eps=1e-3)
        elif self.kind == "group_norm":
            h = F.group_norm(h, 2)
        elif self.kind == "instance_norm":
            h = F.instance_norm(h)
        else:
            h = self.ln(h)
        return self.fc(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer_norm", "group_norm", "instance_norm", "subclass"])
def test_functional_norms_match_autograd(backend, kind):
    torch.manual_seed(4)
    model = Functional(kind).double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    program = dbprop.compile_model(model)
    assert sum(type(op) is nodes.SampleNorm for op in program.ops) == 1 and not program.opaque_nodes
    _check(model, torch.randn(3, 2, 5, 4, dtype=torch.float64), backend)


# ------------------------------------------------------------------------------------------- InstanceNorm
def _instance_net(train, **kw):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.InstanceNorm2d(3, **kw), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 3 * 2, 3)).double()
    with torch.no_grad():
        if model[1].affine:
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.5, 0.5)
        if model[1].track_running_stats:
            model[1].running_mean.uniform_(-0.3, 0.3)
            model[1].running_var.uniform_(0.5, 2.0)
    return model.train(train)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_with_running_statistics_in_eval_mode_is_an_affine_map(backend):
    model = _instance_net(False, affine=True, track_running_stats=True)
    assert type(dbprop.compile_model(model).ops[1]) is nodes.BatchNorm
    _check(model, torch.randn(4, 2, 4, 3, dtype=torch.float64), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_running_statistics_like_one_forward(backend):
    model = _instance_net(True, affine=True, track_running_stats=True)
    reference = copy.deepcopy(model)
    x = torch.randn(5, 2, 4, 3, dtype=torch.float64)
    before = [b.clone() for b in model.buffers()]
    Fn.jacobian_penalty(model, x, backend=backend, strict=True).backward()
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before)), "penalties leave running stats"
    Fn.double_backprop_loss(model, x, torch.tensor([0, 1, 2, 0, 1]), 0.5, backend=backend, strict=True).backward()
    with torch.no_grad():
        reference(x)
    assert not torch.equal(model[1].running_mean, before[0])
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------------------------ refusals
def test_layer_norm_over_the_batch_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm([3, 5]), nn.Linear(5, 2)).double()
    with pytest.raises(UnsupportedModelError, match="batch dimension outside normalized_shape"):
        Fn.jacobian_penalty(model, torch.randn(3, 4, dtype=torch.float64), strict=True)


def test_unbatched_instance_norm_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.InstanceNorm1d(3), nn.Linear(5, 2)).double()
    with pytest.raises(UnsupportedModelError, match="needs a batched input"):
        Fn.jacobian_penalty(model, torch.randn(3, 4, dtype=torch.float64), strict=True)


def test_torch_norm_subclasses_are_not_traced_into():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.SyncBatchNorm(3), nn.Flatten(), nn.Linear(12, 2)).double()
    with pytest.raises(UnsupportedModelError, match=r"'1' \(SyncBatchNorm\) is not supported"):
        dbprop.compile_model(model)
