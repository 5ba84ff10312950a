"""Comparison helpers: dbprop versus autograd double backprop (the fallback, itself checked in test_reference)."""
import torch

from dbprop import fallback
from dbprop.autograd import reduce


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
