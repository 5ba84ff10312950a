"""Native smooth-activation kernels (csrc/kernels/activations.h) against autograd of the PyTorch functions:
g'(z) ⊙ c (activation_derivative_multiply) and Σ_copies g''(z) ⊙ ξ ⊙ q (activation_source), for every name the
extension knows, in float64 (to 1e-12), in low precision against float64, argument checks, and CPU/CUDA parity."""
import pytest
import torch

try:
    from dbprop import _C
    from dbprop import native_ops
    from dbprop.nodes import SMOOTH_ACTIVATIONS
except ImportError:  # extension not built: the pure-PyTorch backend is used and there is nothing to test here
    pytest.skip("dbprop._C is not built", allow_module_level=True)

from helpers import ACCELERATORS, DEVICES

# an activation's test case: the parameter sets (p1, p2) its kernels are checked at, against autograd of the
# torch function of its declaration (dbprop.nodes.SMOOTH_ACTIVATIONS)
PARAMETERS = {
    "gelu": [(0.0, 0.0)],
    "gelu_tanh": [(0.0, 0.0)],
    "silu": [(0.0, 0.0)],
    "elu": [(1.0, 0.0), (0.7, 0.0), (2.5, 0.0)],
    "softplus": [(1.0, 20.0), (2.0, 20.0), (0.5, 5.0), (2.0, 3.0), (-1.5, 20.0)],
    "tanh": [(0.0, 0.0)],
    "sigmoid": [(0.0, 0.0)],
    "mish": [(0.0, 0.0)],
    "hardswish": [(0.0, 0.0)],
    "hardsigmoid": [(0.0, 0.0)],
}
REFERENCE = {name: (row.fn, PARAMETERS[name]) for name, row in SMOOTH_ACTIVATIONS.items() if name in PARAMETERS}
CASES = [(name, p1, p2) for name, (_, params) in REFERENCE.items() for p1, p2 in params]
K = 3  # stacked copies (directions)


def test_every_native_activation_is_tested():
    assert sorted(_C.activation_names()) == sorted(PARAMETERS) == sorted(SMOOTH_ACTIVATIONS)


def draw_z(name, p1, p2, dtype=torch.float64, seed=0):
    """Random z (4, 41): normal values, values near 0 (the kinks), large |z| and, for softplus, values at and
    beyond the threshold β z = threshold."""
    g = torch.Generator().manual_seed(seed)
    special = [0.0, 1e-12, -1e-12, 1e-6, -1e-6, 1e-3, -1e-3, 0.5, -0.75, 3.0, -3.0, 6.0, -6.0, 9.0, -9.0, 15.0,
               -15.0, 25.0, -25.0, 40.0, -40.0]
    if name == "softplus":
        edge = p2 / p1  # exactly representable for the parameter sets above
        special += [edge, edge * (1 + 1e-9), edge * (1 - 1e-9), 2 * edge, edge + 1.0, edge - 1.0, 10 * edge]
    z = torch.cat([3 * torch.randn(4 * 41 - len(special), generator=g, dtype=torch.float64),
                   torch.tensor(special, dtype=torch.float64)])
    return z[torch.randperm(z.numel(), generator=g)].view(4, 41).to(dtype)


def autograd_derivatives(name, z, p1, p2):
    """(g'(z), g''(z)) in float64 from autograd of the PyTorch function."""
    fn = REFERENCE[name][0]
    z = z.detach().to(torch.float64).requires_grad_(True)
    (d1,) = torch.autograd.grad(fn(z, p1, p2).sum(), z, create_graph=True)
    if not d1.requires_grad:  # g' constant in z (hardsigmoid): g'' = 0
        return d1.detach(), torch.zeros_like(d1)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    return d1.detach(), d2


def draw_copies(z, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((k, *z.shape), generator=g, dtype=torch.float64).to(z.dtype) for _ in range(3)]


def references(name, p1, p2, z, c, xi, q):
    d1, d2 = autograd_derivatives(name, z, p1, p2)
    return d1 * c.double(), (d2 * xi.double() * q.double()).sum(0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,p1,p2", CASES)
@pytest.mark.parametrize("k", [1, K])
def test_float64_matches_autograd(name, p1, p2, k, device):
    z = draw_z(name, p1, p2)
    c, xi, q = draw_copies(z, k)
    ref_mul, ref_src = references(name, p1, p2, z, c, xi, q)
    out = native_ops.activation_derivative_multiply(c.to(device), z.to(device), name, p1, p2)
    src = native_ops.activation_source(xi.to(device), q.to(device), z.to(device), name, p1, p2)
    assert out.shape == c.shape and out.dtype == torch.float64 and out.device.type == device
    assert src.shape == z.shape and src.dtype == torch.float64 and src.device.type == device
    torch.testing.assert_close(out.cpu(), ref_mul, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(src.cpu(), ref_src, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,p1,p2", CASES)
def test_derivatives_match_autograd_float64(name, p1, p2):
    """g' and g'' themselves (c = ξ = q = 1, one copy), including the exact kink/threshold conventions."""
    z = draw_z(name, p1, p2, seed=5)
    d1, d2 = autograd_derivatives(name, z, p1, p2)
    ones = torch.ones_like(z)
    torch.testing.assert_close(native_ops.activation_derivative_multiply(ones, z, name, p1, p2), d1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(native_ops.activation_source(ones, ones, z, name, p1, p2), d2, rtol=1e-12, atol=1e-14)


def test_conventions_at_kinks():
    z = torch.tensor([-1e-300, 0.0, 1e-300], dtype=torch.float64)
    one = torch.ones_like(z)
    # elu: g' = α exp(z) for z <= 0, g'' = α exp(z) only for z < 0 (PyTorch's elu_backward / double backward)
    assert native_ops.activation_derivative_multiply(one, z, "elu", 1.5, 0.0).tolist() == [1.5, 1.5, 1.0]
    assert native_ops.activation_source(one, one, z, "elu", 1.5, 0.0).tolist() == [1.5, 0.0, 0.0]
    # softplus: g' = 1 only beyond the threshold (β z > t), g'' = 0 from the threshold on (β z >= t)
    z = torch.tensor([10.0, 10.5], dtype=torch.float64)
    one = torch.ones_like(z)
    d1 = native_ops.activation_derivative_multiply(one, z, "softplus", 2.0, 20.0)
    assert d1[0].item() == pytest.approx(1 / (1 + torch.exp(torch.tensor(-20.0, dtype=torch.float64)).item()),
                                         rel=1e-15)
    assert d1[1].item() == 1.0
    assert native_ops.activation_source(one, one, z, "softplus", 2.0, 20.0).tolist() == [0.0, 0.0]
    # hardswish / hardsigmoid: aten's hardswish_backward / hardsigmoid_backward take the open interval (-3, 3).
    # In float64 aten's hardsigmoid_backward multiplies by 1/6 rounded to float (relative 3e-8); the kernel uses
    # the exact 1/6, the derivative of the float64 function. float32: bit for bit.
    for dtype, rtol in ((torch.float64, 1e-7), (torch.float32, 0.0)):
        z = torch.tensor([-3.5, -3.0, -2.0, 0.0, 3.0, 3.5], dtype=dtype)
        one = torch.ones_like(z)
        for name, fn in (("hardswish", torch.nn.functional.hardswish),
                         ("hardsigmoid", torch.nn.functional.hardsigmoid)):
            zr = z.clone().requires_grad_(True)
            (aten_d1,) = torch.autograd.grad(fn(zr).sum(), zr)
            torch.testing.assert_close(native_ops.activation_derivative_multiply(one, z, name, 0.0, 0.0), aten_d1,
                                       rtol=rtol, atol=0)
    z = torch.tensor([-3.5, -3.0, -2.0, 0.0, 3.0, 3.5], dtype=torch.float64)
    one = torch.ones_like(z)
    assert native_ops.activation_derivative_multiply(one, z, "hardsigmoid", 0.0, 0.0).tolist() == \
        [0.0, 0.0, 1 / 6, 1 / 6, 0.0, 0.0]
    assert native_ops.activation_derivative_multiply(one, z, "hardswish", 0.0, 0.0).tolist() == \
        [0.0, 0.0, -2.0 / 3 + 0.5, 0.5, 1.0, 1.0]  # z/3 + 1/2 at z = -2, as the kernel rounds it
    assert native_ops.activation_source(one, one, z, "hardswish", 0.0, 0.0).tolist() == [0.0, 0.0, 1 / 3, 1 / 3, 0.0, 0.0]
    assert native_ops.activation_source(one, one, z, "hardsigmoid", 0.0, 0.0).tolist() == [0.0] * 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,p1,p2", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_low_precision_against_float64(name, p1, p2, dtype, tol, device):
    """Low precision: op-math (float) evaluation of the rounded inputs, rounded once at the end."""
    z = draw_z(name, p1, p2, dtype=dtype, seed=2)
    c, xi, q = draw_copies(z, seed=3)
    ref_mul, ref_src = references(name, p1, p2, z, c, xi, q)
    out = native_ops.activation_derivative_multiply(c.to(device), z.to(device), name, p1, p2)
    src = native_ops.activation_source(xi.to(device), q.to(device), z.to(device), name, p1, p2)
    assert out.dtype == dtype and src.dtype == dtype and out.device.type == src.device.type == device
    torch.testing.assert_close(out.double().cpu(), ref_mul, rtol=tol, atol=tol * ref_mul.abs().max().item())
    torch.testing.assert_close(src.double().cpu(), ref_src, rtol=tol, atol=tol * ref_src.abs().max().item())


def test_large_tensor_parallel_matches_small_chunks():
    """The parallel launchers give the result of the element bodies regardless of chunking (and repeat exactly)."""
    z = torch.randn(3, 5000, dtype=torch.float64)
    c, xi, q = draw_copies(z)
    for name, p1, p2 in CASES:
        out = native_ops.activation_derivative_multiply(c, z, name, p1, p2)
        src = native_ops.activation_source(xi, q, z, name, p1, p2)
        assert torch.equal(out, native_ops.activation_derivative_multiply(c, z, name, p1, p2))
        assert torch.equal(src, native_ops.activation_source(xi, q, z, name, p1, p2))
        part = slice(0, 7)
        assert torch.equal(out[:, :, part],
                           native_ops.activation_derivative_multiply(c[:, :, part].contiguous(), z[:, part].contiguous(),
                                                             name, p1, p2))
        assert torch.equal(src[:, part], native_ops.activation_source(xi[:, :, part].contiguous(), q[:, :, part].contiguous(),
                                                              z[:, part].contiguous(), name, p1, p2))


def test_argument_checks():
    z = torch.randn(2, 5, dtype=torch.float64)
    c = torch.randn(3, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="unknown activation 'relu'.*gelu.*mish"):
        native_ops.activation_derivative_multiply(c, z, "relu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        native_ops.activation_source(c, c, z, "GELU", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="cotangent is Float but z is Double"):
        native_ops.activation_derivative_multiply(c.float(), z, "gelu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="q is Float but z is Double"):
        native_ops.activation_source(c, c.float(), z, "gelu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="whole positive number of copies"):
        native_ops.activation_derivative_multiply(torch.randn(11, dtype=torch.float64), z, "gelu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="whole positive number of copies"):
        native_ops.activation_source(torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64), z, "silu",
                             0.0, 0.0)
    with pytest.raises(RuntimeError, match="xi has 30 elements but q has 20"):
        native_ops.activation_source(c, c[:2].contiguous(), z, "silu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="empty"):
        native_ops.activation_derivative_multiply(c, z[:0], "tanh", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="whole positive number of copies"):
        native_ops.activation_derivative_multiply(c[:0], z, "tanh", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="must be floating point"):
        native_ops.activation_derivative_multiply(c.long(), z.long(), "tanh", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        native_ops.activation_derivative_multiply(c.transpose(1, 2), z, "tanh", 0.0, 0.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        native_ops.activation_source(c, c, z.t(), "tanh", 0.0, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,p1,p2", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_repeats_exactly_and_equals_the_cpu(name, p1, p2, dtype, tol, device):
    """On every device: the source repeats bit-for-bit (one writer per element, no atomics) and float64 equals
    autograd; off the CPU, both kernels equal the CPU kernels to ``tol``."""
    z = draw_z(name, p1, p2, dtype=dtype, seed=4)
    c, xi, q = draw_copies(z, seed=6)
    zd, cd, xid, qd = (t.to(device) for t in (z, c, xi, q))
    out_dev = native_ops.activation_derivative_multiply(cd, zd, name, p1, p2)
    src_dev = native_ops.activation_source(xid, qd, zd, name, p1, p2)
    assert out_dev.device.type == src_dev.device.type == device
    assert out_dev.dtype == dtype and src_dev.dtype == dtype
    assert torch.equal(src_dev, native_ops.activation_source(xid, qd, zd, name, p1, p2))
    if device != "cpu":
        out = native_ops.activation_derivative_multiply(c, z, name, p1, p2)
        src = native_ops.activation_source(xi, q, z, name, p1, p2)
        torch.testing.assert_close(out_dev.cpu().double(), out.double(), rtol=tol, atol=tol * out.abs().max().item())
        torch.testing.assert_close(src_dev.cpu().double(), src.double(), rtol=tol, atol=tol * src.abs().max().item())
    if dtype == torch.float64:
        ref_mul, ref_src = references(name, p1, p2, z, c, xi, q)
        torch.testing.assert_close(out_dev.cpu(), ref_mul, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(src_dev.cpu(), ref_src, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", ACCELERATORS)
def test_inputs_on_two_devices_are_refused(device):
    z = torch.randn(2, 5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="is on"):
        native_ops.activation_derivative_multiply(torch.randn(3, 2, 5, dtype=torch.float64), z, "gelu", 0.0, 0.0)
