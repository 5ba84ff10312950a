"""The element kernels as dispatcher operators (csrc/ops.cpp, dbprop/native_ops.py): every operator has a sample
here, passes torch.library.opcheck (schema, autograd registration, fake kernel, AOT dispatch) on each device,
runs under FakeTensorMode, and refuses to be differentiated."""
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dbprop

from helpers import DEVICES

pytestmark = pytest.mark.skipif(not dbprop.native_available(), reason="dbprop._C is not built")
if dbprop.native_available():
    from dbprop import _C, native_ops

PYTHON_OPERATORS = {"penalty", "penalty_grads"}  # torch.library.custom_op over the whole penalty (dbprop/ops.py)


def samples(device, dtype):
    """Arguments of every element operator, made with the operators themselves where they consume packed bits."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    z = r(2, 3, 5)
    _, bits = native_ops.forward_epilogue(z, None, 1, 1, 0.0)
    probs = torch.softmax(r(4, 6), -1)
    xhat = r(4, 3, 2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "forward_epilogue": [(z, r(3), 3, 5, 0.0), (z, None, 1, 1, 0.1), (z, r(3), 3, 5, -0.5)],
        "pack_positive": [((r(13) > 0).to(torch.uint8),)],
        "mask_multiply": [(r(2, 2, 3, 5), bits, z.numel(), 0.0)],
        "mask_multiply_bias_grad": [(r(2, 2, 3, 5), bits, z.numel(), 0.2, 3, 5)],
        "softmax_cotangent": [(probs, r(3, 4, 6))],
        "softmax_eta_accumulate": [(probs, r(3, 4, 6), r(3, 4, 6), torch.zeros(4, 6, dtype=acc, device=device))],
        "penalty_head": [(r(3, 4, 5), r(4, 5), name, 0.7, 0.3, torch.rand(4, generator=g, dtype=torch.float64)
                          .to(device=device, dtype=dtype), torch.zeros(4, dtype=acc, device=device), want_q0, want_gx)
                         for name in _C.penalty_head_names() for want_q0, want_gx in [(True, True), (False, False)]]
        + [(r(3, 4, 5), None, "squared_norm", 1.0, 0.0, torch.ones(4, dtype=dtype, device=device),
            torch.zeros(4, dtype=acc, device=device), True, False)],
        "activation_derivative_multiply": [(r(3, 2, 3, 5), z, name, 1.0, 20.0) for name in _C.activation_names()],
        "activation_source": [(r(3, 2, 3, 5), r(3, 2, 3, 5), z, name, 1.0, 20.0) for name in _C.activation_names()],
        "batchnorm_train_linear": [(r(8, 3, 2), xhat, r(3))],
        "batchnorm_train_bbp": [(r(8, 3, 2), r(8, 3, 2), xhat, r(3).abs(), gamma, t, s, m)
                                for gamma in (r(3), None) for t, s, m in [(True, True, True), (False, True, False),
                                                                         (True, False, False), (False, False, False)]]
        + [(None, r(8, 3, 2), xhat, r(3).abs(), None, True, False, False)],
    }


def element_operators():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dbprop::"))


def test_every_operator_has_samples():
    """A new operator in csrc/ops.cpp without a sample (hence without an opcheck) fails here."""
    assert set(element_operators()) == set(samples("cpu", torch.float64)) | PYTHON_OPERATORS




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(samples("cpu", torch.float64)))
def test_opcheck(name, dtype, device):
    op = getattr(torch.ops.dbprop, name).default
    for args in samples(device, dtype)[name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(samples("cpu", torch.float64)))
def test_fake_kernel_matches_real_outputs(name):
    """Under FakeTensorMode every operator produces outputs of the real ones' shapes, dtypes and strides."""
    for args in samples("cpu", torch.float64)[name]:
        real = getattr(torch.ops.dbprop, name)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = getattr(torch.ops.dbprop, name)(*fake_args)
        real = real if isinstance(real, tuple) else () if real is None else (real,)
        fake = fake if isinstance(fake, tuple) else () if fake is None else (fake,)
        assert len(real) == len(fake)
        for a, b in zip(real, fake):
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def test_operators_are_not_differentiable():
    """The kernels are derivative computations: an argument that requires grad is refused (grad mode on) instead
    of giving outputs that silently carry no gradient; under no_grad they run."""
    z = torch.randn(2, 3, dtype=torch.float64)
    _, bits = native_ops.forward_epilogue(z, None, 1, 1, 0.0)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="dbprop::mask_multiply is one of dbprop's derivative kernels and is not "
                                           "differentiable, but its argument 'c' requires grad"):
        native_ops.mask_multiply(c, bits, z.numel(), 0.0)
    with torch.no_grad():
        torch.testing.assert_close(native_ops.mask_multiply(c, bits, z.numel(), 0.0), c.detach() * (z > 0))


def test_in_place_operators_bump_the_version_counter():
    """softmax_eta_accumulate and penalty_head write eta / value: autograd sees the change like any in-place op."""
    probs = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    eta = torch.zeros(4, 6, dtype=torch.float64)
    before = eta._version
    native_ops.softmax_eta_accumulate(probs, torch.randn(2, 4, 6, dtype=torch.float64),
                                      torch.randn(2, 4, 6, dtype=torch.float64), eta)
    assert eta._version > before and eta.abs().sum() > 0
    value = torch.zeros(4, dtype=torch.float64)
    before = value._version
    native_ops.penalty_head(torch.randn(1, 4, 3, dtype=torch.float64), None, "squared_norm", 1.0, 0.0,
                            torch.ones(4, dtype=torch.float64), value, False, False)
    assert value._version > before and value.abs().sum() > 0


def test_penalty_head_checks_x_whenever_given():
    """x is read whenever it is given (not only by the heads that need it): a wrong shape is refused."""
    with pytest.raises(RuntimeError, match="x must have shape"):
        native_ops.penalty_head(torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
                                "squared_norm", 1.0, 0.0, torch.ones(4, dtype=torch.float64),
                                torch.zeros(4, dtype=torch.float64), True, False)
    with pytest.raises(RuntimeError, match="x is required by the 'alignment' head"):
        native_ops.penalty_head(torch.randn(1, 4, 3, dtype=torch.float64), None, "alignment", 0.0, 0.0,
                                torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), True, False)


def test_wrong_device_or_dtype_names_the_argument():
    """Checks run inside every device's kernel (TORCH_CHECK), naming the argument."""
    probs = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    with pytest.raises(RuntimeError, match="probs is Double but directions is Float"):
        native_ops.softmax_cotangent(probs, torch.randn(1, 4, 6))
    with pytest.raises(RuntimeError, match="eta must be Double"):
        native_ops.softmax_eta_accumulate(probs, torch.randn(1, 4, 6, dtype=torch.float64),
                                          torch.randn(1, 4, 6, dtype=torch.float64), torch.zeros(4, 6))
    with pytest.raises(RuntimeError, match="unknown activation 'swish'"):
        native_ops.activation_source(probs, probs, probs, "swish", 0.0, 0.0)


def test_operator_table_is_the_registered_operators():
    """_C.element_operators() (csrc/ops.h's rows) lists exactly the registered element operators, with the schemas
    the dispatcher holds, and every one has a fake kernel (register_fakes refuses the extension otherwise)."""
    table = {name: schema for name, schema, _ in _C.element_operators()}
    assert set(table) == set(element_operators()) - PYTHON_OPERATORS
    for name, schema in table.items():
        assert getattr(torch.ops.dbprop, name).default._schema == torch._C.parse_schema(f"dbprop::{name}{schema}")
    assert set(native_ops.fake_kernels()) == set(table)
    for name, fake in native_ops.fake_kernels().items():  # a fake kernel takes the schema's arguments
        schema = getattr(torch.ops.dbprop, name).default._schema
        assert list(inspect.signature(fake).parameters) == [a.name for a in schema.arguments], name
    with pytest.raises(ImportError, match=r"without a fake kernel \['new_op'\], without an operator \['pack_positive'\]"):
        native_ops.check_fakes([n for n in table if n != "pack_positive"] + ["new_op"])


def test_wrappers_follow_the_schemas():
    """Each wrapper is made from its operator's schema: its parameters are the schema's arguments (keywords work),
    an output r is None unless want_r / need_r asked for it, and an operator returning nothing returns what it
    writes."""
    for name, _, doc in _C.element_operators():
        schema = getattr(torch.ops.dbprop, name).default._schema
        params = inspect.signature(getattr(native_ops, name)).parameters
        assert list(params) == [a.name for a in schema.arguments]
        assert doc in getattr(native_ops, name).__doc__
    xi, value = torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    q0, gx = native_ops.penalty_head(xi, x=None, head="squared_norm", p1=1.0, p2=0.0, weight=torch.ones(4,
                                     dtype=torch.float64), value=value, want_q0=True, want_input_grad=False)
    torch.testing.assert_close(q0, 2 * xi)  # p = ‖ξ‖² per direction, ∇p = 2ξ
    torch.testing.assert_close(value, (xi ** 2).sum((0, 2)))
    assert gx is None
    probs = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    eta = torch.zeros(4, 6, dtype=torch.float64)
    assert native_ops.softmax_eta_accumulate(probs, torch.randn(1, 4, 6, dtype=torch.float64),
                                             torch.randn(1, 4, 6, dtype=torch.float64), eta=eta) is eta
