"""The split program: an immutable IR (dbprop/ir.py), the front-end (dbprop/program.py) and the passes
(dbprop/passes.py), whose per-call values live in the call, so one program serves concurrent and nested calls."""
import dataclasses
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import dbprop
from dbprop import engine
from dbprop import functional as F
from dbprop import penalties as P
from dbprop.nodes import Opaque, PythonKernels, Reshape
from dbprop.passes import Passes

from helpers import BACKENDS  # noqa: E402  (one definition for every test file)


class Probe(nn.Module):
    """A per-channel scale, kept whole as an opaque node: its forward checks its input with a data-dependent
    branch, which torch.fx cannot trace, so the tracer keeps the module whole and the node runs this Python code
    at run time. When ``armed`` with a function, its next forward first calls it (the result kept in ``inner``):
    with a dbprop call, a call nested in a pass."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(channels, 1, 1))
        self.armed, self.inner = None, []

    def forward(self, h):
        if self.armed is not None:
            call, self.armed = self.armed, None
            self.inner.append(call())
        if not torch.isfinite(h).all():  # data-dependent: torch.fx cannot trace it (the module stays opaque)
            raise ValueError("non-finite activation")
        return h * self.scale


class ResidualLN(nn.Module):
    """conv-ReLU, a residual block around an opaque scale, LayerNorm, a traced ``view`` that reads a traced
    ``size`` (a reshape with a meta argument) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.probe = Probe(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.ln = nn.LayerNorm([3, 4, 4])
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = self.ln(h + self.conv2(self.probe(h)))  # h is read again after the probe's (nesting) call
        return self.fc(h.view(h.size(0), -1))


def _model():
    torch.manual_seed(0)
    return ResidualLN().double()


def _inputs(k, batch=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 2, 4, 4, dtype=torch.float64, generator=g) for _ in range(k)]


def _run(program, x, backend):
    r = engine.run(program, P.JacobianFrobenius("softmax"), x, need_param_grads=True, need_input_grad=True,
                   chunk_size=2, backend=backend)
    return [r.value, r.input_grad, *r.param_grads]


def test_the_model_has_opaque_and_reshape_nodes_with_meta_arguments():
    program = dbprop.compile_model(_model())
    kinds = {type(op) for op in program.ops}
    assert Opaque in kinds and Reshape in kinds
    assert list(program.kept_whole) == ["probe"] and "TraceError" in program.kept_whole["probe"]
    assert any(s.op is None for s in program.ir.steps)  # h.size(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_on_one_program_match_sequential_runs(backend):
    model = _model()
    xs = _inputs(4)
    program = dbprop.compile_model(model)
    program.verify(xs[0])
    sequential = [_run(program, x, backend) for x in xs]
    rounds, threads = 3, 2
    results = [[None] * (rounds * len(xs)) for _ in range(threads)]
    errors = []
    barrier = threading.Barrier(threads)

    def worker(t):
        try:
            barrier.wait()
            for i in range(rounds * len(xs)):
                results[t][i] = _run(program, xs[(i + t) % len(xs)], backend)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors
    for t in range(threads):
        for i, got in enumerate(results[t]):
            want = sequential[(i + t) % len(xs)]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (t, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_penalty_nested_in_an_opaque_nodes_forward_runs_on_the_same_program(backend):
    model = _model()
    x, x_inner = _inputs(2)

    def penalty_and_grads(x):
        value = F.jacobian_penalty(model, x, "softmax", chunk_size=2, reduction="none", backend=backend, strict=True)
        return [value.detach(), *torch.autograd.grad(value.sum(), list(model.parameters()))]

    want_outer, want_inner = penalty_and_grads(x), penalty_and_grads(x_inner)[0]
    program = dbprop.program.cached_program(model)
    model.probe.armed = lambda: F.jacobian_penalty(model, x_inner, "softmax", chunk_size=2, reduction="none",
                                                   backend=backend, strict=True).detach()
    got_outer = penalty_and_grads(x)
    assert model.probe.armed is None and len(model.probe.inner) == 1  # it did run nested in the outer pass
    assert dbprop.program.cached_program(model) is program
    assert torch.equal(model.probe.inner[0], want_inner)
    assert all(torch.equal(a, b) for a, b in zip(got_outer, want_outer))


def test_a_forward_pass_nested_in_another_pass_of_the_same_ir():
    model = _model()
    x, x_inner = _inputs(2)
    ir = dbprop.compile_model(model).ir
    with torch.no_grad():
        want_outer, want_inner = model(x), model(x_inner)
    model.probe.armed = lambda: Passes(ir, PythonKernels()).forward(x_inner, keep_inputs=False).output
    got = Passes(ir, PythonKernels()).forward(x, keep_inputs=False).output
    assert model.probe.armed is None and len(model.probe.inner) == 1
    assert torch.allclose(got, want_outer, rtol=0, atol=1e-12)
    assert torch.allclose(model.probe.inner[0], want_inner, rtol=0, atol=1e-12)


def test_the_ir_is_immutable():
    model = _model()
    program = dbprop.compile_model(model)
    ir = program.ir
    for f in dataclasses.fields(ir):
        value = getattr(ir, f.name)
        assert not isinstance(value, (list, dict, set)), f.name
        if isinstance(value, tuple):
            assert not any(isinstance(v, (list, dict, set)) for v in value), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        ir.ops = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ir.output = 0
    with pytest.raises(TypeError):
        ir.ops[0] = ir.ops[1]
    with pytest.raises(TypeError):
        ir.args[1][0] = 0
    with pytest.raises(TypeError):
        ir.consumers[0] += (1,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ir.steps[0].op = 1
    with pytest.raises(AttributeError):
        program.ops = []
    before = {f.name: getattr(ir, f.name) for f in dataclasses.fields(ir)}
    _run(program, _inputs(1)[0], "python")
    assert all(getattr(ir, name) is value for name, value in before.items())
    assert not hasattr(program, "env")


def test_the_passes_do_not_import_the_front_end():
    """No import cycle: the IR and the passes load without dbprop/program.py (the package's __init__, which
    imports everything, is bypassed), and the front-end loads on top of them."""
    package = os.path.dirname(dbprop.__file__)
    code = "\n".join([
        "import sys, types",
        "import torch",
        "pkg = types.ModuleType('dbprop'); pkg.__path__ = [%r]; sys.modules['dbprop'] = pkg" % package,
        "import dbprop.passes, dbprop.ir",
        "loaded = sorted(m for m in sys.modules if m.startswith('dbprop.'))",
        "assert 'dbprop.program' not in loaded, loaded",
        "import dbprop.program",
        "print(' '.join(loaded))",
    ])
    env = {**os.environ, "PYTHONPATH": os.path.dirname(package)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dbprop.passes" in out.stdout.split()
    fresh = subprocess.run([sys.executable, "-c", "import dbprop.passes"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert fresh.returncode == 0, fresh.stderr
