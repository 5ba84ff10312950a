"""Which modules the tracer traces into (dbprop/program.py, ``_Tracer``): user modules are traced into also when
they own parameters or buffers directly (a ConvNeXt block's layer scale becomes a parameter leaf, a buffer a
constant read live); a module that cannot be traced into is kept whole as one opaque node (data-dependent
control flow, Python state changed in its forward, a call dbprop refuses) while the rest of the model stays
native; Python attributes baked into a traced program recompile it when they change; a program that fails its
self-check is compiled again with those modules whole. Every case in float64 against reverse-over-reverse
autograd, relative to the global gradient scale (as tests/test_real_models.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dbprop
from dbprop import fallback, nodes
from dbprop import functional as Fn
from dbprop import penalties as P
from dbprop.program import cached_program

from helpers import BACKENDS, grads_of


def largest_error(model, x, output="softmax", backend="python"):
    """The exact Jacobian penalty by dbprop (strict) and by autograd: the largest error of the value (relative)
    and of the gradients of every parameter and of ``x`` (relative to the largest gradient entry)."""
    x = x.detach().requires_grad_(True)
    value = Fn.jacobian_penalty(model, x, output=output, backend=backend, strict=True)
    ref = fallback.autograd_penalty(model, P.JacobianFrobenius(output), x).mean()
    got, want = grads_of(value, model, x), grads_of(ref, model, x)
    scale = max(w.abs().max().item() for w in want)
    worst = max((g - w).abs().max().item() for g, w in zip(got, want)) / scale
    return max(worst, abs(value.item() - ref.item()) / abs(ref.item()))


class LayerScaleBlock(nn.Module):
    """A ConvNeXt block written by a user: it owns its layer scale ``gamma`` directly (depthwise conv, permute to
    channels-last, LayerNorm, Linear, GELU, Linear, ``* gamma``, permute back, residual)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + (h * self.gamma).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, dim, 2, stride=2)
        self.blocks = nn.Sequential(LayerScaleBlock(dim), LayerScaleBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _x(*shape, seed=1):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["softmax", "logits"])
def test_a_block_owning_its_layer_scale_is_traced_into(backend, output):
    torch.manual_seed(0)
    model = TinyConvNeXt().double()
    program = dbprop.compile_model(model)
    assert not program.opaque_nodes and not program.kept_whole, program.explain()
    leaves = [op.tensor for op in program.ops if isinstance(op, nodes.ParameterLeaf)]
    assert [id(t) for t in leaves] == [id(b.gamma) for b in model.blocks]
    assert sum(isinstance(op, nodes.Product) for op in program.ops) == 2
    assert largest_error(model, _x(3, 2, 6, 6), output, backend) <= 1e-10


class Shifted(nn.Module):
    """A user module owning a buffer and a parameter: ``x * self.scale + self.bias`` (the buffer a constant)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, n))
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.3, n))

    def forward(self, x):
        return x * self.scale + self.bias


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.shift, self.fc2 = nn.Linear(4, 5), Shifted(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.shift(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_owning_a_buffer_is_traced_into_and_reads_it_live(backend):
    torch.manual_seed(0)
    model = WithBuffer().double()
    program = cached_program(model)
    assert not program.opaque_nodes, program.explain()
    assert any(p is model.shift.bias for p in program.parameters())
    assert all(p is not model.shift.scale for p in program.parameters())  # a constant, no gradient
    x = _x(6, 4)
    assert largest_error(model, x, backend=backend) <= 1e-10
    with torch.no_grad():
        model.shift.scale.mul_(-1.5)  # changed in place: the program reads it live
    assert largest_error(model, x, backend=backend) <= 1e-10
    assert cached_program(model) is program


class Checked(nn.Module):
    """Owns a parameter and checks its input with a data-dependent branch, which torch.fx cannot trace."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, h):
        if h.abs().max() > 1e6:
            h = h / h.abs().max()
        return torch.tanh(h) * self.scale


class Clamped(nn.Module):
    """Owns nothing; a data-dependent branch (before, it made the whole model untraceable)."""

    def forward(self, h):
        return torch.sigmoid(h) if bool(h.sum() > -1e9) else h


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.checked, self.fc2 = nn.Linear(4, 6), Checked(6), nn.Linear(6, 6)
        self.clamped, self.fc3 = Clamped(), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(self.clamped(self.fc2(self.checked(self.fc1(x))) + x.mean(1, keepdim=True)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_untraceable_module_is_kept_whole_and_the_rest_stays_native(backend):
    torch.manual_seed(0)
    model = WithUntraceable().double()
    program = dbprop.compile_model(model)
    assert sorted(program.kept_whole) == ["checked", "clamped"]
    assert all("TraceError" in why for why in program.kept_whole.values())
    opaque = [program.ops[n] for n in program.opaque_nodes]
    assert [op.name for op in opaque] == ["checked", "clamped"], program.explain()
    assert [p for p in opaque[0].params()] == [model.checked.scale]
    assert len(program.ops) - len(opaque) >= 5  # fc1, fc2, the mean, +, fc3: native
    assert "kept whole: 'checked' (Checked): torch.fx cannot trace its forward" in program.explain()
    assert largest_error(model, _x(5, 4), backend=backend) <= 1e-10


def test_an_untraceable_root_is_still_refused():
    with pytest.raises(dbprop.UnsupportedModelError, match="torch.fx cannot trace Checked.*TraceError"):
        dbprop.compile_model(Checked(3))


class Counting(nn.Module):
    """Owns a parameter and counts its calls: Python state a traced program would not update."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        return torch.tanh(h) * self.w


class Remembering(nn.Module):
    """Owns a parameter and keeps its last activation as an attribute."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(1.5, 0.5, n))
        self.last = None

    def forward(self, h):
        self.last = torch.sin(h) * self.w
        return self.last


class InPlace(nn.Module):
    """Owns parameters and updates an activation in place (dbprop refuses in-place calls on traced tensors)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, h):
        y = self.fc(h)
        y.mul_(self.w)
        return y


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.count, self.keep = nn.Linear(4, 5), Counting(5), Remembering(5)
        self.inplace, self.fc2 = InPlace(5), nn.Linear(5, 3)

    def forward(self, x):
        self.features = x  # the root keeps an attribute too: the trace must not leave a proxy there
        return self.fc2(self.inplace(self.keep(self.count(self.fc1(x)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_with_python_state_or_refused_calls_are_kept_whole(backend):
    torch.manual_seed(0)
    model = Stateful().double()
    program = dbprop.compile_model(model)
    why = program.kept_whole
    assert sorted(why) == ["count", "inplace", "keep"], program.explain()
    assert "calls" in why["count"] and "last" in why["keep"] and "in-place" in why["inplace"]
    assert not any(isinstance(v, torch.fx.Proxy) for m in model.modules() for v in vars(m).values())
    assert largest_error(model, _x(5, 4), backend=backend) <= 1e-10


class Tempered(nn.Module):
    """Owns a parameter and reads a Python number (a temperature a training loop anneals)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.tensor([0.5, 1.0, 2.0]))
        self.temperature = 2.0

    def forward(self, x):
        return self.fc(x) * self.w / self.temperature


def test_a_python_attribute_baked_into_the_program_recompiles_it_when_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Tempered()).double()
    x = _x(5, 4)
    assert largest_error(model, x) <= 1e-10
    first = cached_program(model)
    assert not first.opaque_nodes
    assert cached_program(model) is first
    model[2].temperature = 0.25
    assert first.state_changed()
    assert largest_error(model, x) <= 1e-10  # the program sees the new temperature
    assert cached_program(model) is not first


class TracedDifferently(nn.Module):
    """Owns a parameter; its forward computes something else while torch.fx traces it (a stand-in for anything
    a trace bakes in that differs at run time): only the self-check can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, 1.0, 2.0]))

    def forward(self, h):
        if isinstance(h, torch.fx.Proxy):
            return h * self.w * 2.0
        return h * self.w


def test_a_program_failing_its_self_check_is_compiled_again_with_such_modules_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), TracedDifferently(), nn.Linear(3, 3)).double()
    program = dbprop.compile_model(model)
    assert not program.opaque_nodes
    x = _x(5, 4)
    program.verify(x)
    assert program.verified and list(program.kept_whole) == ["2"], program.explain()
    assert [program.ops[n].name for n in program.opaque_nodes] == ["2"]
    assert largest_error(model, x) <= 1e-10
