"""The real-model suite: torchvision and timm architectures with random weights, as a user would build them,
compiled by dbprop and compared with reverse-over-reverse autograd in float64 (train and eval mode).

It runs where torchvision and timm import (CI's second environment, torch 2.14.1) and skips elsewhere. For each
model it checks

* the program's native-node fraction (``MIN_NATIVE``: a floor per model, so that a node kind that stops matching
  fails here);
* no fallback: the penalty runs with ``strict=True``;
* exactness of the exact Jacobian penalty (softmax output: every second-order term is non-zero), value and the
  gradients of every parameter and of ``x``, against autograd, relative to the global gradient scale (BatchNorm
  shifts followed by another BatchNorm have a true gradient of zero, so per-tensor errors are meaningless there).
  autograd has no double backward for ``hardsigmoid``, so for MobileNetV3 the reference is autograd on a copy
  whose ``Hardsigmoid`` modules compute :func:`dbprop.nodes.hardsigmoid_reference` (equal values and ``g'``);
* for MobileNetV3-Small, independently of any autograd reference: the parameter gradients of the exact Jacobian
  penalty and of DoubleBackpropLoss against central finite differences of the penalty value along random
  parameter directions (:func:`test_mobilenet_v3_finite_differences`).

Dropout and stochastic depth are switched off (``p = 0``): the two sides would draw different masks.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

tv = pytest.importorskip("torchvision.models", reason="torchvision does not import here (core environment)")
timm = pytest.importorskip("timm", reason="timm does not import here (core environment)")

import dbprop  # noqa: E402
from dbprop import fallback, nodes  # noqa: E402
from dbprop import functional as Fn  # noqa: E402
from dbprop import penalties as P  # noqa: E402

from helpers import deterministic_algorithms, grads_of  # noqa: E402

C = 5  # classes: small heads keep float64 autograd double backprop fast


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "p") and isinstance(getattr(m, "p"), float) and type(m).__name__ in {
                "Dropout", "Dropout2d", "StochasticDepth"}:
            m.p = 0.0
        if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def _tv_vit() -> nn.Module:
    """torchvision's ViT-B/16 architecture at a small size; its head and class token start at zero (the output
    would not depend on ``x``): random here."""
    model = tv.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=16, mlp_dim=32, num_classes=C)
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.5)
        nn.init.normal_(model.class_token, std=0.5)
    return model


#: name -> (constructor with random weights and C classes, input side, native-fraction floor). The floors are the
#: measured fractions (bench/realmodels.py); ConvNeXt blocks, which own their layer-scale parameter, are traced into
#: (the layer scale a parameter leaf)
MODELS = {
    "tv_resnet18": (lambda: tv.resnet18(num_classes=C), 32, 1.0),
    "tv_vgg11_bn": (lambda: tv.vgg11_bn(num_classes=C), 32, 1.0),
    "tv_mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=C, dropout=0.0), 32, 1.0),
    "tv_regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=C), 32, 1.0),
    "tv_convnext_tiny": (lambda: tv.convnext_tiny(num_classes=C, stochastic_depth_prob=0.0), 32, 1.0),
    "tv_efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=C, stochastic_depth_prob=0.0, dropout=0.0),
                           32, 1.0),
    "tv_mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=C, dropout=0.0), 32, 1.0),
    "tv_mobilenet_v3_large": (lambda: tv.mobilenet_v3_large(num_classes=C, dropout=0.0), 32, 1.0),
    "tv_shufflenet_v2_x1_0": (lambda: tv.shufflenet_v2_x1_0(num_classes=C), 32, 1.0),
    "tv_regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=C), 32, 1.0),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=C), 32, 1.0),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=C), 32, 1.0),
    "timm_regnety_002": (lambda: timm.create_model("regnety_002", num_classes=C), 32, 1.0),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=C), 32, 1.0),
    "timm_resnetv2_50": (lambda: timm.create_model("resnetv2_50", num_classes=C), 32, 1.0),
    # vision transformers, small configurations (two blocks): torchvision's nn.MultiheadAttention is expanded into
    # traced calls, timm's Attention is traced into
    "tv_vit": (lambda: _tv_vit(), 32, 1.0),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                                num_classes=C), 32, 1.0),
}

class HardsigmoidReference(nn.Module):
    def forward(self, x):
        return nodes.hardsigmoid_reference(x)


def autograd_reference(model: nn.Module) -> nn.Module:
    """``model``, or a copy sharing its parameters whose ``Hardsigmoid`` modules autograd can differentiate twice."""
    if not any(isinstance(m, nn.Hardsigmoid) for m in model.modules()):
        return model
    ref = copy.copy(model)
    ref._modules = dict(model._modules)
    for name, child in model.named_children():
        ref._modules[name] = HardsigmoidReference() if isinstance(child, nn.Hardsigmoid) else autograd_reference(child)
    return ref


def native_fraction(program) -> float:
    return sum(op.native for op in program.ops) / len(program.ops)


def _build(name: str, train: bool):
    torch.manual_seed(0)
    make, side, _ = MODELS[name]
    model = _no_dropout(make()).double().train(train)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_fraction(name):
    model, _ = _build(name, train=True)
    program = dbprop.compile_model(model)
    assert native_fraction(program) >= MODELS[name][2], program.explain()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_against_autograd(name, train):
    model, x = _build(name, train)
    err, _ = largest_error(model, x)
    assert err <= 1e-10, f"largest error {err:.3g} of the global gradient scale"


def largest_error(model: nn.Module, x: torch.Tensor):
    """The exact Jacobian penalty (softmax) by dbprop (strict: no fallback) and by reverse-over-reverse autograd
    on ``autograd_reference(model)``: the largest error of the value (relative) and of any gradient (parameters
    and ``x``, relative to the largest gradient entry), and the reference value."""
    x = x.detach().requires_grad_(True)
    torch.manual_seed(1)
    value = Fn.jacobian_penalty(model, x, output="softmax", strict=True)
    got = grads_of(value, model, x)
    torch.manual_seed(1)
    ref = fallback.autograd_penalty(autograd_reference(model), P.JacobianFrobenius("softmax"), x).mean()
    want = grads_of(ref, model, x)
    scale = max(w.abs().max().item() for w in want)
    worst = max((g - w).abs().max().item() for g, w in zip(got, want)) / scale
    return max(worst, abs(value.item() - ref.item()) / abs(ref.item())), ref.item()


# ------------------------------------------------------------------------------------- finite differences
#: step and tolerance of the central differences: measured (float64, directions scaled per tensor) the error
#: falls as ε² down to ε = 1e-7, where it is 1e-10 to 2e-8 of ⟨g, d⟩; below that rounding takes over
FD_EPS = 1e-7
FD_TOL = 1e-6
#: where the derivative of each piecewise activation of MobileNetV3 jumps: a step across one changes the
#: Jacobian by a jump, not by O(ε), so the directions used are those whose ±ε steps cross none
KINKS = {nn.ReLU: (0.0,), nn.Hardswish: (-3.0, 3.0), nn.Hardsigmoid: (-3.0, 3.0)}


def kink_regions(model: nn.Module, x: torch.Tensor):
    """For each piecewise activation call, which interval between its kinks each input entry lies in (read
    before the call: MobileNetV3's activations work in place)."""
    found = []
    hooks = [m.register_forward_pre_hook(lambda m, i: found.append(sum((i[0] > k).to(torch.int8)
                                                                        for k in KINKS[type(m)])))
             for m in model.modules() if type(m) in KINKS]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def calibrate_batchnorm(model: nn.Module, side: int, batches: int = 4) -> None:
    """Running statistics as training would leave them (cumulative averages over a few random batches): with
    the initial ones (mean 0, variance 1) eval-mode activations grow through the depth until the softmax
    saturates (a penalty of 1e-21)."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, side, side, generator=gen, dtype=torch.float64))


class _FrozenBuffers:
    """Restores the model's buffers (BatchNorm running statistics) on exit: every evaluation sees the same."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(b, b.clone()) for b in model.buffers()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


FD_PENALTIES = {
    "jacobian": (lambda model, x, y: Fn.jacobian_penalty(model, x, output="softmax", strict=True),
                 lambda y: P.JacobianFrobenius("softmax")),
    "double_backprop": (lambda model, x, y: dbprop.DoubleBackpropLoss(model, 0.7, strict=True)(x, y),
                        lambda y: P.DoubleBackprop(y, 0.7)),
}


def _mobilenet_v3_small(train: bool, batch: int, side: int = 32):
    torch.manual_seed(0)
    model = _no_dropout(tv.mobilenet_v3_small(num_classes=C, dropout=0.0)).double()
    if not train:
        calibrate_batchnorm(model, side)
    model.train(train)
    x = torch.randn(batch, 3, side, side, dtype=torch.float64)
    return model, x, torch.tensor([1, 3, 0, 4][:batch])


def test_mobilenet_v3_autograd_has_no_double_backward():
    """Why MobileNetV3 has no plain autograd row: reverse-over-reverse stops at ``hardsigmoid_backward`` (the
    Hardsigmoid of its squeeze-excitation blocks), which has no derivative in ATen."""
    model, x, _ = _mobilenet_v3_small(train=False, batch=2)
    value = fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x.requires_grad_(True)).mean()
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        torch.autograd.grad(value, list(model.parameters()))


@pytest.mark.parametrize("penalty", sorted(FD_PENALTIES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_mobilenet_v3_finite_differences(train, penalty):
    """dbprop's parameter gradient ``g`` of the penalty ``R`` (no autograd double backward involved) against
    central differences of ``R``'s value along random directions ``d``: ``⟨g, d⟩`` vs
    ``(R(θ + εd) − R(θ − εd)) / 2ε``. ``R`` at θ also equals autograd's value on the reference copy.

    Batch statistics of train-mode BatchNorm over 2 samples at MobileNetV3's last 1×1 maps are nearly
    degenerate (second derivatives of 1e6 against a value of 4), hence 4 samples in train mode; eval mode uses
    calibrated running statistics (:func:`calibrate_batchnorm`). Each parameter tensor moves in proportion to
    its root mean square (at least 1e-2). The value function is the very penalty differentiated: the same call,
    under ``torch.no_grad``, with the buffers restored after every evaluation (DoubleBackpropLoss updates the
    running statistics in train mode), in deterministic mode (no chunk-size or formulation timing, so every
    evaluation sums in the same order)."""
    model, x, y = _mobilenet_v3_small(train, batch=4 if train else 2)
    call, head = FD_PENALTIES[penalty]
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]

    def value(t=0.0, d=None):
        with torch.no_grad(), _FrozenBuffers(model):
            if d is not None:
                for p, p0, di in zip(params, theta, d):
                    p.copy_(p0 + t * di)
            try:
                return call(model, x, y).item()
            finally:
                for p, p0 in zip(params, theta):
                    p.copy_(p0)

    with deterministic_algorithms():
        with _FrozenBuffers(model):
            r = call(model, x, y)
            g = torch.autograd.grad(r, params)
        with _FrozenBuffers(model):
            ref = fallback.autograd_penalty(autograd_reference(model), head(y), x).mean().item()
        assert abs(r.item() - ref) <= 1e-10 * abs(ref), (r.item(), ref)
        assert value() == r.item()  # the value function is the penalty differentiated, bit for bit
        gen = torch.Generator().manual_seed(2)
        base, checked, tries = kink_regions(model, x), 0, 0
        while checked < 2:
            tries += 1
            assert tries <= 10, "every direction drawn crosses a kink within ±ε"
            d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.detach().pow(2).mean().sqrt().clamp_min(1e-2)
                 for p in params]
            crossed = False
            for t in (FD_EPS, -FD_EPS):
                with torch.no_grad():
                    for p, p0, di in zip(params, theta, d):
                        p.copy_(p0 + t * di)
                crossed = crossed or any(not torch.equal(a, b) for a, b in zip(base, kink_regions(model, x)))
                with torch.no_grad():
                    for p, p0 in zip(params, theta):
                        p.copy_(p0)
            if crossed:
                continue
            checked += 1
            exact = sum((gi * di).sum() for gi, di in zip(g, d)).item()
            fd = (value(FD_EPS, d) - value(-FD_EPS, d)) / (2 * FD_EPS)
            assert abs(fd - exact) <= FD_TOL * abs(exact), f"<g, d> = {exact:.10g}, finite difference {fd:.10g}"
