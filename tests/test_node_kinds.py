"""The registry of node-kind cases: every node kind of dbprop/nodes.py has a small odd-shaped float64 model that
compiles to a node of that kind, and each case's exact Jacobian penalty (softmax output: η_L, mixed terms and
sources all non-zero) equals reverse-over-reverse autograd double backprop, value and all gradients, on every
backend and device (CUDA: the same cases, skipped without a GPU)."""
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import dbprop
from dbprop import fallback, nodes
from dbprop import functional as Fn
from dbprop import penalties as P

from helpers import BACKENDS, DEVICES, assert_grads_close, grads_of
from standins import DropPath, StochasticDepth


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.tanh(self.a(x)) + self.b(x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        return torch.cat([torch.sigmoid(self.a(x)), self.b(x)], 1)


class MeanOverSpace(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


class ViewFlat(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


# ---- routing (docs/maths.md §4.12)
class ChannelShuffle(nn.Module):
    """ShuffleNet v2's unit: channel split, one branch convolved, concatenation, channel shuffle."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h), nn.Conv2d(h, h, 1), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        B, C, H, W = y.size()
        return y.view(B, 2, C // 2, H, W).transpose(1, 2).contiguous().view(B, -1, H, W)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block without its LayerNorm and layer scale: depthwise conv, channels-last MLP, residual."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.drop = StochasticDepth(0.3, "row")

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.drop(y)


class Indexing(nn.Module):
    """Slices, None, Ellipsis, integers, negative dimensions, select, narrow, .mT, movedim, transpose."""

    def forward(self, x):                      # (B, 3, 4, 5)
        y = x[:, 1:, None, ..., ::2]           # (B, 2, 1, 4, 3)
        y = y.squeeze(-3).mT.narrow(-1, 1, 3)  # (B, 2, 3, 3)
        z = torch.movedim(x.select(1, 0), -1, 1)[..., 1]  # (B, 5)
        return torch.cat([torch.tanh(y).flatten(1), torch.transpose(z.unsqueeze(2), -1, 1).flatten(1)], 1)


class FlipRoll(nn.Module):
    def forward(self, x):                      # (B, 3, 4)
        return torch.cat([x.flip(-1, 1), torch.roll(x, 2, 2), x.diagonal(0, 1, 2).unsqueeze(2)], 2).flatten(1)


class SplitResidual(nn.Module):
    """``torch.split`` with sizes and ``tensor.split`` with equal sizes, the items summed into a residual."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 7)

    def forward(self, x):
        a, b = torch.split(self.fc(x), [3, 4], dim=-1)
        c, d = b.split(2, 1)
        e = x.unbind(1)[2].unsqueeze(1)
        return torch.tanh(a) + torch.cat([torch.sigmoid(c), e], 1) + d.narrow(1, 0, 1)


class AdaptiveMax1d(nn.Module):
    def forward(self, x):
        return nn.functional.adaptive_max_pool1d(x, 3)


class Wave(nn.Module):
    """A user module owning a parameter, traced into: ``x * self.freq`` is a product with a parameter leaf and
    ``torch.sin``, a call the program does not know, an opaque node."""

    def __init__(self, n):
        super().__init__()
        self.freq = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return torch.sin(x * self.freq)


class CheckedWave(Wave):
    """Wave with a data-dependent branch, which torch.fx cannot trace: kept whole, an opaque node with its own
    parameter (its gradient from local autograd)."""

    def forward(self, x):
        if x.abs().max() > 1e6:
            x = x / x.abs().max()
        return torch.sin(x * self.freq)

# ---- parameter leaves, products, constants (issue 17 items 2, 5a, 6)
class TinyViT(nn.Module):
    """Tokens from a Linear on (B, S, D) inputs, a class-token parameter concatenated (expanded: a parameter
    function), a position embedding added, a layer-scale product, a mean over tokens."""

    def __init__(self, s=4, d_in=5, d=6):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, s + 1, d) * 0.5)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1) + self.pos
        h = h + self.gamma * torch.tanh(self.mlp(h))
        return self.head(h.mean(1))


class FunctionalLinear(nn.Module):
    """F.linear with parameters read in the forward, on (B, S, D) tokens."""

    def __init__(self):
        super().__init__()
        self.W1, self.b1 = nn.Parameter(torch.randn(6, 5) * 0.5), nn.Parameter(torch.randn(6))
        self.W2 = nn.Parameter(torch.randn(3, 6) * 0.5)

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, self.W1, self.b1)), self.W2)[:, 0]


class SqueezeExcite(nn.Module):
    """conv -> mean over (2, 3) keepdim -> 1×1 convs -> sigmoid -> x * s (s of shape (B, C, 1, 1))."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3)
        self.reduce, self.expand = nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1)
        self.head = nn.Linear(c * 6, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        return self.head((h * s).flatten(1))


class Gated(nn.Module):
    """GLU-style gating a * silu(b), torch.mul and x.mul of two activations, a difference of two activations."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        g = torch.mul(a * torch.nn.functional.silu(b), torch.sigmoid(a)) - torch.tanh(b)
        return self.c(g.mul(g))


class Normalised(nn.Module):
    """Input normalisation with buffers and scalar affine maps: (x - mean) / std, 2 * h + 1, -h, x.div(c),
    torch.sub, x.mul(buffer), h * 0.5, 1 - h, a layer scale read from a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1))
        self.register_buffer("std", torch.tensor([0.5, 2.0, 1.5]).view(3, 1))
        self.register_buffer("scale", torch.tensor([1.5, -0.5, 2.0, 0.7]))
        self.conv = nn.Conv1d(3, 4, 2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = self.conv(2 * ((x - self.mean) / self.std) + 1)
        h = torch.sub(-torch.tanh(h.transpose(1, 2).mul(self.scale)), 0.25).div(3.0)
        return self.fc((1 - h * 0.5).flatten(1))


# ---- attention (issue 18, docs/maths.md §4.17)
class HeadsAttention(nn.Module):
    """timm-style self-attention on (B, N, D) tokens: qkv Linear, reshape, permute, unbind into 3 heads, causal
    ``F.scaled_dot_product_attention``, heads merged, a projection, a GELU and a mean over tokens."""

    def __init__(self, d=6, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, 4)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return nn.functional.gelu(self.proj(h.transpose(1, 2).reshape(B, N, D))).mean(1)


class CrossAttention(nn.Module):
    """Attention without heads on (B, L, E), keys and values one node (``k = v``), an odd number of keys, a scale."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):                      # (B, 7, 4): queries from the first 3 tokens, keys from all 7
        kv = torch.tanh(self.kv(x))
        return nn.functional.scaled_dot_product_attention(self.q(x[:, :3]), kv, kv, scale=0.8).flatten(1)


def _seq(*layers):
    return lambda: nn.Sequential(*layers)


#: kind -> {case name: (model factory, per-sample input shape)}; the models end in a Linear with C outputs
CASES = {
    nodes.Linear: {"mlp": (_seq(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), (5,)),
                   "tokens": (_seq(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3), nn.Flatten(), nn.Linear(6, 3)), (2, 5)),
                   "tokens-chain": (_seq(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Flatten(), nn.Linear(9, 3)),
                                    (3, 5)),  # the native chain driver (csrc/passes.cpp) on (B, S, D)
                   "functional": (FunctionalLinear, (4, 5))},
    nodes.Conv: {"conv2d": (_seq(nn.Conv2d(2, 3, 3, 2, 1), nn.GELU(), nn.Flatten(), nn.Linear(3 * 3 * 2, 3)), (2, 5, 4)),
                 "conv1d": (_seq(nn.Conv1d(2, 3, 2, dilation=2), nn.SiLU(), nn.Flatten(), nn.Linear(15, 3)), (2, 7))},
    nodes.BatchNorm: {
        "train": (_seq(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), (2, 4, 4)),
        "eval": (lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ELU(), nn.Linear(5, 3)).eval(), (4,))},
    nodes.PiecewiseLinearActivation: {
        name: (_seq(nn.Linear(4, 6), act, nn.Linear(6, 3)), (4,))
        for name, act in [("relu", nn.ReLU()), ("leaky", nn.LeakyReLU(0.2)), ("relu6", nn.ReLU6()),
                          ("hardtanh", nn.Hardtanh(-0.5, 0.7))]},
    nodes.SmoothActivation: {
        name: (_seq(nn.Linear(4, 6), module, nn.Linear(6, 3)), (4,))
        for name, module in [("gelu", nn.GELU()), ("gelu_tanh", nn.GELU("tanh")), ("silu", nn.SiLU()),
                             ("elu", nn.ELU(0.7)), ("softplus", nn.Softplus(2.0, 3.0)), ("tanh", nn.Tanh()),
                             ("sigmoid", nn.Sigmoid()), ("mish", nn.Mish())]},
    nodes.Identity: {"identity": (_seq(nn.Linear(4, 5), nn.Identity(), nn.Tanh(), nn.Linear(5, 3)), (4,))},
    nodes.Dropout: {"eval": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.4),
                                                   nn.Linear(5, 3)).eval(), (4,))},
    nodes.Reshape: {"flatten": (_seq(nn.Conv1d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)), (2, 3)),
                    "view": (_seq(nn.Conv1d(2, 2, 2), nn.Tanh(), ViewFlat(), nn.Linear(4, 3)), (2, 3))},
    nodes.MaxPool: {"2d": (_seq(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(), nn.Linear(8, 3)),
                           (1, 4, 4)),
                    "1d": (_seq(nn.Conv1d(1, 2, 2), nn.Tanh(), nn.MaxPool1d(3, 2, 1), nn.Flatten(), nn.Linear(6, 3)),
                           (1, 6))},
    nodes.AvgPool: {"2d": (_seq(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.AvgPool2d(2, 1, ceil_mode=True), nn.Flatten(),
                                nn.Linear(8, 3)), (1, 4, 4))},
    nodes.AdaptiveAvgPool: {"2d": (_seq(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(),
                                        nn.Linear(4, 3)), (1, 5, 4))},
    nodes.Mean: {"spatial": (_seq(nn.Conv2d(1, 4, 2), nn.Softplus(), MeanOverSpace(), nn.Linear(4, 3)), (1, 3, 4))},
    nodes.Add: {"residual": (_seq(nn.Conv2d(2, 2, 1), Residual(2), nn.Flatten(), nn.Linear(18, 3)), (2, 3, 3))},
    nodes.Cat: {"cat": (_seq(Concat(), nn.Tanh(), nn.Linear(5, 3)), (5,))},
    # routing (docs/maths.md §4.12)
    nodes.Route: {
        "shuffle": (_seq(nn.Conv2d(3, 4, 1), ChannelShuffle(4), nn.Flatten(), nn.Linear(4 * 3 * 2, 3)), (3, 3, 2)),
        "convnext": (lambda: nn.Sequential(nn.Conv2d(2, 3, 1), ConvNeXtLike(3), nn.Tanh(), nn.Flatten(),
                                           nn.Linear(3 * 3 * 2, 3)).eval(), (2, 3, 2)),
        "indexing": (_seq(nn.Conv2d(2, 3, 1), nn.SiLU(), Indexing(), nn.Linear(18 + 5, 3)), (2, 4, 5)),
        "split": (_seq(SplitResidual(), nn.Linear(3, 3)), (4,)),
        "flip-roll": (_seq(nn.Conv1d(2, 3, 1), nn.Softplus(), FlipRoll(), nn.Linear(3 * 9, 3)), (2, 4))},
    nodes.AdaptiveMaxPool: {
        "2d": (_seq(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.AdaptiveMaxPool2d((2, None)), nn.Flatten(), nn.Linear(16, 3)),
               (1, 5, 5)),
        "1d": (_seq(nn.Conv1d(2, 2, 2), nn.ELU(), AdaptiveMax1d(), nn.Flatten(), nn.Linear(6, 3)), (2, 8))},
    nodes.DropPath: {
        "torchvision-eval": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), StochasticDepth(0.4, "row"),
                                                   nn.Linear(5, 3)).eval(), (4,)),
        "timm-p0-train": (_seq(nn.Linear(4, 5), nn.Tanh(), DropPath(0.0), nn.Linear(5, 3)), (4,))},
    nodes.Opaque: {"unknown-module": (_seq(nn.Linear(4, 5), Wave(5), nn.Linear(5, 3)), (4,)),
                   "torch-module": (_seq(nn.Linear(4, 5), nn.PReLU(5, 0.3), nn.Linear(5, 3)), (4,)),
                   "kept-whole": (_seq(nn.Linear(4, 5), CheckedWave(5), nn.Linear(5, 3)), (4,))},
    # issue 17 items 2, 5a, 6: parameter leaves, products, constants
    nodes.ParameterLeaf: {"vit": (TinyViT, (4, 5))},
    nodes.ParameterFunction: {"class-token": (TinyViT, (4, 5))},
    nodes.Product: {"squeeze-excite": (SqueezeExcite, (2, 4, 5)), "gating": (Gated, (5,)),
                    "layer-scale": (TinyViT, (4, 5))},
    nodes.Difference: {"gating": (Gated, (5,))},
    nodes.ConstantAffine: {"normalise": (Normalised, (3, 4))},
    nodes.Attention: {"heads-causal": (_seq(HeadsAttention(), nn.Linear(4, 3)), (5, 6)),
                      "cross-no-heads": (_seq(CrossAttention(), nn.Linear(9, 3)), (7, 4))},
}


# ---- issue 17: per-sample norms (LayerNorm, GroupNorm, InstanceNorm) and the hard activations
def _norm_affine_noise(make):
    """``make()`` with its norms' γ, β drawn away from (1, 0), so that γ's place in (4.14)-(4.16) is tested."""
    def build():
        model = make()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)):
                    if m.weight is not None:
                        m.weight.uniform_(0.5, 1.5)
                    if m.bias is not None:
                        m.bias.uniform_(-0.5, 0.5)
        return model
    return build


CASES[nodes.SampleNorm] = {
    "layernorm": (_norm_affine_noise(_seq(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))), (4,)),
    "layernorm-2d-no-bias": (_norm_affine_noise(_seq(nn.Conv2d(2, 3, 2), nn.LayerNorm([4, 3], bias=False), nn.GELU(),
                                                     nn.Flatten(), nn.Linear(36, 3))), (2, 5, 4)),
    "layernorm-no-affine": (_seq(nn.Conv1d(2, 3, 2), nn.LayerNorm(4, elementwise_affine=False), nn.Tanh(),
                                 nn.Flatten(), nn.Linear(12, 3)), (2, 5)),
    "groupnorm": (_norm_affine_noise(_seq(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.SiLU(), nn.Flatten(),
                                          nn.Linear(6 * 5 * 3, 3))), (2, 5, 3)),
    "groupnorm-no-affine": (_seq(nn.Conv1d(2, 4, 2), nn.GroupNorm(2, 4, affine=False), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(20, 3)), (2, 6)),
    "instancenorm1d": (_norm_affine_noise(_seq(nn.Conv1d(2, 4, 2), nn.InstanceNorm1d(4, affine=True), nn.Tanh(),
                                               nn.Flatten(), nn.Linear(20, 3))), (2, 6)),
    "instancenorm2d-train-stats": (_seq(nn.Conv2d(2, 3, 2), nn.InstanceNorm2d(3, track_running_stats=True),
                                        nn.Softplus(), nn.Flatten(), nn.Linear(24, 3)), (2, 5, 3)),
}
CASES[nodes.SmoothActivation]["hardswish"] = (_seq(nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 3)), (4,))
# Hardsigmoid: autograd has no double backward for it; tests/test_hard_activations.py compares it with an equal
# expression that autograd can differentiate twice
ABSTRACT = {nodes.Op, nodes.Unary, nodes.Affine}
PARAMS = [(kind, name) for kind, cases in CASES.items() for name in cases]


def test_every_node_kind_has_a_case():
    kinds = {cls for cls in nodes.node_kinds() if cls.__module__ == nodes.__name__} - ABSTRACT
    assert kinds <= set(CASES), f"node kinds without a case: {sorted(k.__name__ for k in kinds - set(CASES))}"


def _build(kind, name, device):
    torch.manual_seed(11)
    make, shape = CASES[kind][name]
    model = make().double().to(device)
    x = torch.randn(3, *shape, dtype=torch.float64, device=device) * 1.3
    return model, x


@pytest.mark.parametrize("kind,name", PARAMS, ids=[f"{k.__name__}-{n}" for k, n in PARAMS])
def test_case_compiles_to_its_kind(kind, name):
    model, x = _build(kind, name, "cpu")
    assert any(type(op) is kind for op in dbprop.compile_model(model).ops)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,name", PARAMS, ids=[f"{k.__name__}-{n}" for k, n in PARAMS])
def test_case_matches_reverse_over_reverse_autograd(kind, name, backend, device):
    model, x = _build(kind, name, device)
    x.requires_grad_(True)
    value = Fn.jacobian_penalty(model, x, output="softmax", backend=backend, strict=True)
    got = grads_of(value, model, x)
    with sdpa_kernel(SDPBackend.MATH):  # torch's fused attention kernels have no double backward
        ref = fallback.autograd_penalty(model, P.JacobianFrobenius("softmax"), x).mean()
    want = grads_of(ref, model, x)
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    assert_grads_close(got, want, rtol=1e-9)
