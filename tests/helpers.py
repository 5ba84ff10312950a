"""Comparison helpers: dbprop versus autograd double backprop (the fallback, itself checked in test_reference)."""
import contextlib

import pytest
import torch

import dbprop
from dbprop import fallback
from dbprop.core import reduce


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if dbprop.native_available() and not dbprop.backend_info().get("cuda"):
        return "needs dbprop._C built with CUDA"
    return ""


#: the backends every backend-parametrised case runs on
BACKENDS = ["python"] + (["native"] if dbprop.native_available() else [])
#: the devices every device-parametrised case runs on: the CUDA variants are the same cases on device="cuda",
#: skipped without a GPU (or with an extension built without CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(bool(_cuda_skip_reason()),
                                                                reason=_cuda_skip_reason() or "runs"))]
#: the devices other than the CPU: cases that compare a device with the CPU or mix devices
ACCELERATORS = DEVICES[1:]


def grads_of(value, model, x):
    inputs = [p for p in model.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
    return torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)


def max_rel_err(a, b):
    """max |a − b| / max |b| over each pair of tensors (exact zeros must match exactly)."""
    worst = 0.0
    for u, v in zip(a, b):
        scale = v.abs().max().item()
        diff = (u - v).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def assert_grads_close(got, want, rtol=1e-9):
    """‖a − b‖ < rtol · max(‖b‖, 1e-6 · the largest ‖b‖) per pair: the floor covers gradients that are exactly
    zero in theory (biases before a train-mode BatchNorm), where both sides hold rounding noise."""
    floor = 1e-6 * max(b.norm().item() for b in want)
    for a, b in zip(got, want):
        assert (a - b).norm().item() < rtol * max(b.norm().item(), floor)


def compare(model, x, call, head, reduction="mean", seed=7, weights=None):
    """Run ``call()`` (a dbprop penalty) and the autograd reference on ``head`` with the same RNG stream;
    return (value, reference value, relative error of value and of all gradients)."""
    torch.manual_seed(seed)
    value = call()
    torch.manual_seed(seed)
    ref = reduce(fallback.autograd_penalty(model, head, x), reduction)
    if weights is not None:
        value, ref = (value * weights).sum(), (ref * weights).sum()
    g, gr = grads_of(value, model, x), grads_of(ref, model, x)
    return value.detach(), ref.detach(), max(max_rel_err([value], [ref]), max_rel_err(g, gr))


def saliencies(model, x, backend="python"):
    """ξ_0 for every class and the cotangent at every node's output, from the dbprop backward pass (standard
    backprop, v = e_i): ``(program, logits, ξ_0 (C, B, ...), {node: cotangent (C, B, ...)})``."""
    import dbprop
    from dbprop.engine import make_passes
    program = dbprop.compile_model(model)
    P = make_passes(program, backend)
    fp = P.forward(x, keep_inputs=False)
    B, C = fp.output.shape
    v = torch.eye(C, dtype=x.dtype)[:, None, :].expand(C, B, C).flatten(0, 1)
    xi, kept = P.backward(fp, v, keep=True)
    return program, fp.output, xi.unflatten(0, (C, B)), {n: c.unflatten(0, (C, B)) for n, c in kept.items()}


def bias_terms(program, cotangents, batch, num_classes, dtype):
    """Σ_j ⟨b_j, ∇_{b_j} Ψ_i⟩ per sample and class (Theorem 1): affine biases, and eval-mode BatchNorm's shift
    β − γ μ/σ acting as a bias."""
    from dbprop.nodes import Affine, BatchNorm
    total = torch.zeros(batch, num_classes, dtype=dtype)
    for n, c in cotangents.items():
        op = program.ops[n]
        if isinstance(op, Affine) and op.bias is not None:
            b = op.bias
        elif isinstance(op, BatchNorm) and not op.batch_stats:
            m = op.module
            scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.weight is not None else 1.0)
            b = (m.bias if m.bias is not None else 0.0) - scale * m.running_mean
        else:
            continue
        per_sample = c.sum(list(range(3, c.dim()))) if c.dim() > 3 else c
        total += (per_sample * b).sum(-1).T
    return total


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside, the previous setting restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
