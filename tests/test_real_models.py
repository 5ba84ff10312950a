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
  whose ``Hardsigmoid`` modules compute :func:`dbprop.nodes.hardsigmoid_reference` (equal values and ``g'``).

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

from helpers import grads_of  # noqa: E402

C = 5  # classes: small heads keep float64 autograd double backprop fast


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "p") and isinstance(getattr(m, "p"), float) and type(m).__name__ in {
                "Dropout", "Dropout2d", "StochasticDepth"}:
            m.p = 0.0
        if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
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
