"""The native backend (dbprop._C): equal to the python backend, element kernels against their definitions,
packed masks, low precision, argument checks; the parity and kernel cases also on a GPU when there is one
(helpers.DEVICES)."""
import pytest
import torch

import dbprop
from dbprop import functional as F
from dbprop import penalties as P

from helpers import DEVICES, deterministic_algorithms, grads_of, max_rel_err
from nets import NETS, build, draw_input

pytestmark = pytest.mark.skipif(not dbprop.native_available(), reason="dbprop._C is not built")
if dbprop.native_available():
    from dbprop import _C
    from dbprop import native_ops as K

CALLS = {
    "jacobian-logits": lambda m, x, b: F.jacobian_penalty(m, x, backend=b),
    "jacobian-softmax": lambda m, x, b: F.jacobian_penalty(m, x, output="softmax", chunk_size=2, backend=b),
    "random-softmax": lambda m, x, b: F.jacobian_penalty(m, x, output="softmax", estimator="random",
                                                         num_projections=2, backend=b),
    "double-backprop": lambda m, x, b: F.double_backprop_loss(m, x, torch.tensor([0, 1, 2]), 0.5, backend=b),
    "spectral": lambda m, x, b: F.spectral_norm_penalty(m, x, output="softmax", backend=b),
    "alignment": lambda m, x, b: F.alignment_penalty(m, x, torch.tensor([0, 1, 2]), backend=b),
}


def _run(model, x, call, backend, seed=3):
    torch.manual_seed(seed)
    value = call(model, x, backend)
    return [value.detach(), *grads_of(value, model, x)]


def _parity(model, x, case):
    return max_rel_err(_run(model, x, CALLS[case], "native"), _run(model, x, CALLS[case], "python"))


#: native-vs-python tolerance per device type
PARITY_TOL = {"cpu": 1e-12, "cuda": 1e-10}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("case", sorted(CALLS))
def test_native_equals_python_float64(net, case, device):
    model, shape = build(net)
    x = draw_input(model, shape, 3)
    model, x = model.to(device), x.to(device).requires_grad_(True)
    assert _parity(model, x, case) <= PARITY_TOL[device]


@pytest.mark.parametrize("net", ["conv2d", "conv1d", "mlp"])
def test_native_equals_python_float32(net):
    model, shape = build(net, dtype=torch.float32)
    x = draw_input(model, shape, 3, dtype=torch.float32)
    assert _parity(model, x, "jacobian-softmax") <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorch(dtype):
    """Error against float64 of the native backend <= 2x that of the python backend at the same precision."""
    model, shape = build("conv2d")
    x = draw_input(model, shape, 4)
    ref = _run(model, x, CALLS["jacobian-softmax"], "python")
    low_model, low_x = build("conv2d", dtype=dtype)[0], x.to(dtype)
    errs = {}
    for backend in ("native", "python"):
        out = _run(low_model, low_x, CALLS["jacobian-softmax"], backend)
        assert all(t.dtype == dtype for t in out)
        errs[backend] = max_rel_err([t.double() for t in out], ref)
    assert errs["native"] <= 2 * errs["python"] + 1e-3, errs


def test_gradcheck_through_native_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool1d(2),
                                torch.nn.Flatten(), torch.nn.Linear(9, 3)).double()
    x = draw_input(model, (2, 6), 2).requires_grad_(True)

    def f(x, *params):
        return F.jacobian_penalty(model, x, output="softmax", backend="native")

    assert torch.autograd.gradcheck(f, (x, *model.parameters()), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------ element kernels
def _unpack(bits, n):
    return ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:n].bool()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 7, 13, 37, 64, 1001])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slope", [0.0, 0.1, -0.3])
def test_packed_mask_round_trip_odd_sizes(n, dtype, slope, device):
    z = torch.randn(n, dtype=torch.float64).to(dtype).to(device)
    x, bits = K.forward_epilogue(z, None, 1, 1, slope)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8 and bits.device == z.device
    assert torch.equal(_unpack(bits.cpu(), n), (z > 0).cpu())
    torch.testing.assert_close(x, torch.nn.functional.leaky_relu(z, slope))
    c = torch.randn(3 * n, dtype=torch.float64).to(dtype).to(device)  # three stacked directions
    expected = torch.where((z > 0).repeat(3), c, c * slope)
    torch.testing.assert_close(K.mask_multiply(c, bits, n, slope), expected)


@pytest.mark.parametrize("shape,channels,inner", [((5, 3), 3, 1), ((2, 4, 3, 5), 4, 15), ((3, 2, 7), 2, 7)])
def test_epilogue_bias_and_fused_bias_gradient(shape, channels, inner):
    z = torch.randn(shape, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64)
    b = bias if inner == 1 else bias.view(-1, *([1] * (len(shape) - 2)))
    x, bits = K.forward_epilogue(z, bias, channels, inner, 0.0)
    torch.testing.assert_close(x, torch.relu(z + b))
    c = torch.randn(2 * shape[0], *shape[1:], dtype=torch.float64)
    eta, db = K.mask_multiply_bias_grad(c, bits, z.numel(), 0.0, channels, inner)
    expected = c * (z + b > 0).repeat(2, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(eta, expected)
    dims = [0] + list(range(2, len(shape))) if inner > 1 else [0]
    torch.testing.assert_close(db, expected.sum(dims))


def test_softmax_kernels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = torch.softmax(z, -1)
    v, h = (torch.randn(3, 4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(K.softmax_cotangent(x, v), P.softmax_adjoint(x, v))
    eta = K.softmax_eta_accumulate(x, v, h, torch.zeros(4, 6, dtype=torch.float64))
    torch.testing.assert_close(eta, P.softmax_eta(x, v, h).sum(0))


HEADS = {"squared-norm": lambda: P.JacobianFrobenius(), "spectral": lambda: P.SpectralNorm(),
         "gradient-norm": lambda: P.GradientNorm(0.7), "alignment": lambda: P.Alignment(0),
         "relevance": lambda: P.Relevance(0, 0.3, 1.1)}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_penalty_head_kernel_equals_python_head(name):
    """p, q_0 = w∇p and Σ_k w ∂p/∂x of every penalty head in the native kernel, against dbprop.penalties."""
    head = HEADS[name]()
    g = torch.Generator().manual_seed(1)
    xi = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64)
    head_name, p1, p2 = head.native_head
    value = torch.zeros(4, dtype=torch.float64)
    q0, gx = K.penalty_head(xi, x, head_name, p1, p2, w, value, True, True)
    torch.testing.assert_close(value, head.value(xi, x).sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(q0, head.q0(xi, x) * w[None, :, None], rtol=1e-12, atol=1e-14)
    direct = head.input_grad(xi, x)
    expected = torch.zeros_like(x) if direct is None else (direct * w[None, :, None]).sum(0)
    torch.testing.assert_close(gx, expected, rtol=1e-12, atol=1e-14)


def test_native_checks_name_the_argument():
    z = torch.randn(10, dtype=torch.float64)
    x, bits = K.forward_epilogue(z, None, 1, 1, 0.0)
    with pytest.raises(RuntimeError, match="bits holds 2 bytes"):
        K.mask_multiply(torch.randn(30, dtype=torch.float64), bits, 30, 0.0)
    with pytest.raises(RuntimeError, match="whole number of copies"):
        K.mask_multiply(torch.randn(15, dtype=torch.float64), bits, 10, 0.0)
    with pytest.raises(RuntimeError, match="empty"):
        K.forward_epilogue(torch.randn(0, dtype=torch.float64), None, 1, 1, 0.0)
    with pytest.raises(RuntimeError, match="bias has 3 elements"):
        K.forward_epilogue(z.view(5, 2), torch.zeros(3, dtype=torch.float64), 2, 1, 0.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        K.mask_multiply(torch.randn(10, 2, dtype=torch.float64)[:, 0], bits, 10, 0.0)
    with pytest.raises(RuntimeError, match="sample_weight must have shape"):
        K.penalty_head(torch.randn(1, 4, 3, dtype=torch.float64), None, "squared_norm", 1.0, 0.0,
                       torch.ones(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), True, False)
    with pytest.raises(RuntimeError, match="x must have shape"):
        K.penalty_head(torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
                       "alignment", 0.0, 0.0, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                       True, False)
    with pytest.raises(RuntimeError, match="unknown penalty head 'hinge'; known: squared_norm spectral"):
        K.penalty_head(torch.randn(1, 4, 3, dtype=torch.float64), None, "hinge", 1.0, 0.0,
                       torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), True, False)


def test_native_forward_rejects_empty_batch_and_mismatch():
    model, shape = build("mlp")
    program = dbprop.compile_model(model).native()
    with pytest.raises(RuntimeError, match="non-empty batch"):
        _C.forward(program, torch.zeros(0, *shape, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="x is Float but the weights are Double"):
        _C.forward(program, torch.zeros(2, *shape), False)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_gradient_is_deterministic_under_deterministic_algorithms(device):
    z = torch.randn(64 * 8 * 25, dtype=torch.float32, device=device)
    _, bits = K.forward_epilogue(z, None, 1, 1, 0.0)
    c = torch.randn(2 * z.numel(), dtype=torch.float32, device=device)
    fused = K.mask_multiply_bias_grad(c, bits, z.numel(), 0.0, 8, 25)
    with deterministic_algorithms():
        runs = [K.mask_multiply_bias_grad(c, bits, z.numel(), 0.0, 8, 25) for _ in range(3)]
    assert all(torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1]) for r in runs)
    torch.testing.assert_close(runs[0][0], fused[0])
    torch.testing.assert_close(runs[0][1], fused[1], rtol=1e-5, atol=1e-4)


def test_native_penalties_repeat_bit_for_bit_under_deterministic_algorithms():
    model, shape = build("conv2d")
    x = draw_input(model, shape, 3)
    with deterministic_algorithms():
        runs = [_run(model, x, CALLS["jacobian-softmax"], "native") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
