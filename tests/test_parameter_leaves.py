"""Parameter leaves, products and constant affine maps (docs/maths.md §4.12, §4.13) beyond the node-kind registry:
constants whose leading size equals the batch, 0-d parameters, quotients by nodes (opaque, exact), buffers (no
gradient), parameters that do not require grad, and the lowering of each traced form."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbprop
from dbprop import fallback, nodes
from dbprop import functional as Fn
from dbprop import penalties as P

from helpers import assert_grads_close, grads_of

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)


class Broadcasts(nn.Module):
    """A position embedding of shape (S, D) with S equal to the batch, a (S, 1) scale broadcasting a (B, 1, D)
    activation, a leaf added and multiplied, a 0-d scale and a quotient by a parameter and by an activation."""

    def __init__(self):
        super().__init__()
        self.pos, self.p2 = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 1))
        self.a, self.t = nn.Parameter(torch.tensor(1.3)), nn.Parameter(torch.rand(4) + 1)
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(self.a * x) + self.pos)        # (B, 3, 4) + (3, 4)
        h = torch.sigmoid(h[:, :1] * self.p2) / self.t         # (B, 1, 4) * (3, 1) -> (B, 3, 4)
        h = (h + self.p2) * h / (1.5 + h)
        return self.out(h.flatten(1))


class Frozen(nn.Module):
    """A layer scale that does not require grad, a buffer shift and a product of a node with itself."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]), requires_grad=False)
        self.register_buffer("shift", torch.tensor([0.1, 0.2, -0.3]))
        self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x - self.shift)) * self.gamma
        return self.fc2(h * h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,shape", [(Broadcasts, (3, 4)), (Frozen, (3,))], ids=["broadcasts", "frozen"])
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_matches_reverse_over_reverse_autograd(make, shape, backend, output):
    torch.manual_seed(5)
    model = make().double()
    x = torch.randn(3, *shape, dtype=torch.float64, requires_grad=True)
    value = Fn.jacobian_penalty(model, x, output=output, backend=backend, strict=True)
    ref = fallback.autograd_penalty(model, P.JacobianFrobenius(output), x).mean()
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    assert_grads_close(grads_of(value, model, x), grads_of(ref, model, x), rtol=1e-9)


def test_lowering_of_each_form():
    program = dbprop.compile_model(Broadcasts().double())
    kinds = [type(op) for op in program.ops]
    assert kinds.count(nodes.ParameterLeaf) == 4 and nodes.Product in kinds
    assert sum(k is nodes.Opaque for k in kinds) == 2  # the quotient by t, the quotient by an activation
    assert nodes.Route in kinds  # the slice (docs/maths.md §4.12)
    quotient = [op for op in program.ops if isinstance(op, nodes.ConstantAffine)]
    assert [op.how for op in quotient] == ["shift"]   # 1.5 + h
    frozen = dbprop.compile_model(Frozen())
    assert [p for p in frozen.parameters() if not p.requires_grad] == [frozen.model.gamma]
    assert all(b is not frozen.model.shift for b in frozen.parameters())  # a buffer is a constant, not a leaf


def test_functional_linear_reads_the_live_parameters():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, self.W)

    model = Functional().double()
    program = dbprop.compile_model(model)
    assert [type(op) for op in program.ops] == [nodes.Linear] and program.parameters() == [model.W]
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        model.W.mul_(2.0)
    from dbprop.engine import make_passes
    out = make_passes(program, "python").forward(x, keep_inputs=False).output
    torch.testing.assert_close(out, model(x))


def test_a_constant_broadcasting_along_the_batch_is_refused():
    class AlongBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.randn(2, 4, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x * self.c).sum(1)

    model = AlongBatch().double()
    x = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(dbprop.UnsupportedModelError, match="broadcasts .* along the batch dimension"):
        Fn.jacobian_penalty(model, x, output="logits", strict=True)


def test_a_transposed_parameter_attribute_is_a_parameter_function():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.tanh(x) @ self.W.T

    torch.manual_seed(2)
    model = Transposed().double()
    assert nodes.ParameterFunction in {type(op) for op in dbprop.compile_model(model).ops}
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    value = Fn.jacobian_penalty(model, x, output="softmax", strict=True)
    ref = fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x).mean()
    assert_grads_close(grads_of(value, model, x), grads_of(ref, model, x), rtol=1e-9)


class Casts(nn.Module):
    """``t.type(dtype)`` is a cast that keeps ``t``'s derivatives (CLIP adds ``positional_embedding.type(dtype)``):
    of a parameter (its gradient must not be dropped) and of an activation (a node, not a constant)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.w = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = h * self.w.type(torch.float64) + self.w.type(h.dtype)
        return self.l2(torch.atan2(h, torch.sin(h).type(torch.float64) + 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_type_casts_keep_their_derivatives(backend):
    torch.manual_seed(5)
    model = Casts().double()
    assert any(p is model.w for p in dbprop.compile_model(model).parameters())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    value = Fn.jacobian_penalty(model, x, output="softmax", backend=backend, strict=True)
    ref = fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x).mean()
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    assert_grads_close(grads_of(value, model, x), grads_of(ref, model, x), rtol=1e-9)
