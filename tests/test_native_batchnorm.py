"""Native train-mode BatchNorm kernels (csrc/kernels/batchnorm.h, docs/maths.md §4.9): batchnorm_train_linear
(A q, 4.3) and batchnorm_train_bbp (A q, the source 4.6 and the γ mixed term 4.5 from one reduction pass) against
the Python reference (PythonKernels) and against autograd of F.batch_norm (float64, to 1e-12), in low precision
against float64, argument checks, the BatchNorm node on both backends, and CPU/CUDA parity."""
import pytest
import torch
import torch.nn.functional as F

from dbprop.nodes import PythonKernels

from helpers import DEVICES

try:
    from dbprop import _C, native_ops  # noqa: F401  (_C: the module is skipped without the extension)
    from dbprop.native import NativeKernels
except ImportError:  # extension not built: the pure-PyTorch backend is used and there is nothing to test here
    pytest.skip("dbprop._C is not built", allow_module_level=True)

EPS = 1e-5
SHAPES = [(5, 3), (4, 3, 5), (3, 2, 3, 4)]  # BatchNorm1d on (B, C) (S = 1), 1d with length, 2d
PY = PythonKernels()


def _channel(v, dim):
    return v.view(1, -1, *([1] * (dim - 2)))


def make_case(shape, k, gamma=True, dtype=torch.float64, seed=0):
    """x (B, C, ...), its saved (x̂, 1/σ) as the BatchNorm node computes them, γ, and ξ, q of k copies."""
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0)
    invstd = torch.rsqrt(var + EPS)
    xhat = (x - _channel(mean, x.dim())) * _channel(invstd, x.dim())
    C = shape[1]
    gam = (torch.randn(C, generator=g, dtype=torch.float64) + 1.0).to(dtype) if gamma else None
    xi = torch.randn((k * shape[0], *shape[1:]), generator=g, dtype=torch.float64).to(dtype)
    q = torch.randn((k * shape[0], *shape[1:]), generator=g, dtype=torch.float64).to(dtype)
    return x, xhat, invstd, gam, xi, q


def autograd_truth(x, gamma, xi, q):
    """(A q, ŝ = ∂_x Σ_k ⟨ξ_k, A q_k⟩, ∂_γ Σ_k ⟨ξ_k, A q_k⟩) by reverse-over-reverse autograd of F.batch_norm
    (train mode), per copy; γ = 1 stands for γ None."""
    B = x.shape[0]
    xs = x.double().detach().requires_grad_(True)
    g = (torch.ones(x.shape[1], dtype=torch.float64) if gamma is None else gamma.double()).requires_grad_(True)
    tangents, source, dgamma = [], 0, 0
    for xi_k, q_k in zip(xi.double().split(B), q.double().split(B)):
        v = xi_k.clone().requires_grad_(True)
        y = F.batch_norm(xs, None, None, g, None, True, 0.0, EPS)
        (u,) = torch.autograd.grad(y, xs, v, create_graph=True)  # u = Aᵀ ξ, differentiable in (ξ, x, γ)
        a_q, s_x, s_g = torch.autograd.grad((u * q_k).sum(), (v, xs, g))
        tangents.append(a_q)
        source, dgamma = source + s_x, dgamma + s_g
    return torch.cat(tangents), source, dgamma


def assert_rel(actual, expected, rel):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def on(device, *tensors):
    """The tensors (None kept) moved to ``device``."""
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("gamma", [True, False])
def test_float64_native_and_reference_match_autograd(shape, k, gamma, device):
    x, xhat, invstd, gam, xi, q = make_case(shape, k, gamma)
    truth = autograd_truth(x, gam, xi, q)
    xhat, invstd, gam, xi, q = on(device, xhat, invstd, gam, xi, q)
    for K in (NativeKernels(), PY):
        tangent, source, dgamma = K.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
        assert tangent.shape == q.shape and source.shape == x.shape and dgamma.shape == (shape[1],)
        assert tangent.dtype == source.dtype == dgamma.dtype == torch.float64
        assert tangent.device == source.device == dgamma.device == xhat.device
        for got, want in zip((tangent, source, dgamma), truth):
            assert_rel(got.cpu(), want, 1e-12)
        scale = invstd if gam is None else gam * invstd
        assert_rel(K.batchnorm_train_linear(q, xhat, scale).cpu(), truth[0], 1e-12)
        # A is self-adjoint: ⟨ξ, A q⟩ = ⟨A ξ, q⟩
        lhs = (xi * K.batchnorm_train_linear(q, xhat, scale)).sum()
        rhs = (K.batchnorm_train_linear(xi, xhat, scale) * q).sum()
        assert abs(lhs - rhs).item() <= 1e-12 * max(abs(lhs).item(), 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_native_equals_reference_to_rounding(shape):
    x, xhat, invstd, gam, xi, q = make_case(shape, 3, seed=1)
    nat = native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
    ref = PY.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
    for a, b in zip(nat, ref):
        assert_rel(a, b, 1e-13)
    # the one-pass call equals the separate calls
    assert torch.equal(nat[0], native_ops.batchnorm_train_linear(q, xhat, gam * invstd))
    assert torch.equal(nat[1], native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, False, True, False)[1])
    assert torch.equal(nat[2], native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, False, False, True)[2])


def test_flags_select_outputs():
    _, xhat, invstd, gam, xi, q = make_case((4, 3, 5), 2)
    for K in (NativeKernels(), PY):
        t, s, g = K.batchnorm_train_bbp(None, q, xhat, invstd, gam, True, False, False)  # tangent only: no ξ
        assert t is not None and s is None and g is None
        assert_rel(t, K.batchnorm_train_linear(q, xhat, gam * invstd), 1e-14)
        t, s, g = K.batchnorm_train_bbp(xi, q, xhat, invstd, None, False, True, False)
        assert t is None and s is not None and g is None
        with pytest.raises(RuntimeError, match="xi is required"):
            K.batchnorm_train_bbp(None, q, xhat, invstd, gam, True, True, False)
    assert native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, False, False, False) == (None, None, None)


def test_large_tensor_parallel_matches_reference_and_repeats():
    """Sizes that split into several parallel tasks, S not a multiple of the reduction's lane count."""
    x, xhat, invstd, gam, xi, q = make_case((16, 24, 9, 11), 3, seed=2)
    nat = native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
    ref = PY.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
    for a, b in zip(nat, ref):
        assert_rel(a, b, 1e-12)
    for a, b in zip(nat, native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)):
        assert torch.equal(a, b)  # deterministic: no atomics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_low_precision_against_float64(shape, dtype, tol, device):
    """Low precision inputs, moments accumulated in the accumulation type, each output rounded once: compared
    with the float64 reference (on the CPU) on the same (rounded) inputs."""
    _, xhat, invstd, gam, xi, q = make_case(shape, 3, dtype=dtype, seed=3)
    ref = PY.batchnorm_train_bbp(*(t.double() for t in (xi, q, xhat, invstd, gam)), True, True, True)
    scale = (gam.double() * invstd.double()).to(dtype)
    xhat, invstd, gam, xi, q, scale = on(device, xhat, invstd, gam, xi, q, scale)
    nat = native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
    lin = native_ops.batchnorm_train_linear(q, xhat, scale)
    for got, want in zip((*nat, lin), (*ref, ref[0])):
        assert got.dtype == dtype and got.device == xhat.device
        assert_rel(got.double().cpu(), want, tol)


def test_argument_checks():
    _, xhat, invstd, gam, xi, q = make_case((4, 3, 5), 2)
    f = torch.float64
    with pytest.raises(RuntimeError, match=r"q must have shape \(k·B, C, ...\).*\[4, 3, 5\]; got \[7, 3, 5\]"):
        native_ops.batchnorm_train_linear(torch.randn(7, 3, 5, dtype=f), xhat, invstd)
    with pytest.raises(RuntimeError, match=r"q must have shape.*got \[8, 2, 5\]"):
        native_ops.batchnorm_train_linear(torch.randn(8, 2, 5, dtype=f), xhat, invstd)
    with pytest.raises(RuntimeError, match=r"q must have shape.*got \[8, 15\]"):
        native_ops.batchnorm_train_linear(torch.randn(8, 15, dtype=f), xhat, invstd)
    with pytest.raises(RuntimeError, match="q is Float but xhat is Double"):
        native_ops.batchnorm_train_linear(q.float(), xhat, invstd)
    with pytest.raises(RuntimeError, match="scale is Float but xhat is Double"):
        native_ops.batchnorm_train_linear(q, xhat, invstd.float())
    with pytest.raises(RuntimeError, match=r"scale must have shape \(3,\)"):
        native_ops.batchnorm_train_linear(q, xhat, invstd[:2])
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        native_ops.batchnorm_train_linear(q.transpose(1, 2).contiguous().transpose(1, 2), xhat, invstd)
    with pytest.raises(RuntimeError, match="must be floating point"):
        native_ops.batchnorm_train_linear(q.long(), xhat.long(), invstd.long())
    with pytest.raises(RuntimeError, match="xhat must be a non-empty"):
        native_ops.batchnorm_train_linear(q, xhat[:, :0].contiguous(), invstd)
    with pytest.raises(RuntimeError, match="xhat must be a non-empty"):
        native_ops.batchnorm_train_linear(q.view(-1), xhat.view(-1), invstd)
    with pytest.raises(RuntimeError, match=r"xi \[4, 3, 5\] and q \[8, 3, 5\] differ in shape"):
        native_ops.batchnorm_train_bbp(xi[:4].contiguous(), q, xhat, invstd, gam, True, True, True)
    with pytest.raises(RuntimeError, match="xi is required"):
        native_ops.batchnorm_train_bbp(None, q, xhat, invstd, gam, False, False, True)
    with pytest.raises(RuntimeError, match=r"gamma must have shape \(3,\)"):
        native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, torch.ones(4, dtype=f), True, True, True)
    with pytest.raises(RuntimeError, match="invstd is Float but xhat is Double"):
        native_ops.batchnorm_train_bbp(xi, q, xhat, invstd.float(), gam, True, True, True)
    with pytest.raises(RuntimeError, match="xi is Float but xhat is Double"):
        native_ops.batchnorm_train_bbp(xi.float(), q, xhat, invstd, gam, True, True, True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("want", [[True, False], [False, True], [False, False]])
def test_node_bbp_step_backends_agree(affine, want):
    """The BatchNorm node (train mode): one bbp_step call on both kernel sets, and its pieces through the
    per-operator methods (tangent / mixed / source)."""
    from dbprop.nodes import BatchNorm, RunContext

    torch.manual_seed(4)
    bn = torch.nn.BatchNorm2d(3, affine=affine).double().train()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
    node = BatchNorm("bn", bn)
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    _, saved = node.forward(x, RunContext(PY, False, False, 4))
    xi, q = torch.randn(2, 12, 3, 2, 5, dtype=torch.float64)
    want = want if affine else []
    with torch.no_grad():
        results = [node.bbp_step(xi, [q], saved, want, True, K) for K in (PY, NativeKernels())]
    for (ta, ma, sa), (tb, mb, sb) in zip(results, results[1:]):
        assert_rel(tb, ta, 1e-13)
        assert_rel(sb[0], sa[0], 1e-13)
        assert len(ma) == len(mb) == len(want)
        for a, b in zip(ma, mb):
            assert (a is None) == (b is None)
            if a is not None:
                assert_rel(b, a, 1e-13)
    t, m, s = results[1]
    K = NativeKernels()
    assert torch.equal(t, node.tangent([q], saved, K))
    assert torch.equal(s[0], node.source(xi, [q], saved, K)[0])
    if want and want[0]:
        assert torch.equal(m[0], node.mixed(xi, [q], saved, want, K)[0])
    assert node.bbp_step(None, [q], saved, want, True, K)[1] == [None] * len(want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES + [(16, 24, 9, 11)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 1.6e-2),
                                       (torch.float16, 2e-3)])
def test_repeats_exactly_and_equals_the_cpu(shape, dtype, tol, device):
    """On every device: repeated calls are bit-for-bit equal (no atomics); off the CPU, the results equal the
    CPU kernels' to ``tol`` and inputs on two devices are refused."""
    _, xhat, invstd, gam, xi, q = make_case(shape, 3, dtype=dtype, seed=5)
    dev = on(device, xi, q, xhat, invstd, gam)
    out = native_ops.batchnorm_train_bbp(*dev, True, True, True)
    lin = native_ops.batchnorm_train_linear(dev[1], dev[2], (gam * invstd).to(device))
    for a in out:
        assert a.device == dev[0].device and a.dtype == dtype
    for a, b in zip(out, native_ops.batchnorm_train_bbp(*dev, True, True, True)):
        assert torch.equal(a, b)  # deterministic
    if device != "cpu":
        cpu = native_ops.batchnorm_train_bbp(xi, q, xhat, invstd, gam, True, True, True)
        for a, b in zip(out, cpu):
            assert_rel(a.cpu().double(), b.double(), tol)
        assert_rel(lin.cpu().double(), native_ops.batchnorm_train_linear(q, xhat, gam * invstd).double(), tol)
        with pytest.raises(RuntimeError, match="is on"):
            native_ops.batchnorm_train_linear(q, dev[2], dev[3])
