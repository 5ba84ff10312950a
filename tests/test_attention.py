"""Attention as a node kind (docs/maths.md §4.17): ``F.scaled_dot_product_attention`` of three traced nodes in
small transformer blocks, float64, against reverse-over-reverse autograd on torch's math backend (its fused
kernels have no double backward), for the Jacobian penalty (logits and softmax), the double-backprop loss and
the gradient penalty; causal, boolean and additive masks, odd sequence lengths, several heads; the operators
themselves against autograd; what is refused."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import dbprop
from dbprop import fallback, nodes
from dbprop import functional as Fn
from dbprop import penalties as P
from dbprop.errors import UnsupportedModelError

from helpers import BACKENDS, assert_grads_close, grads_of


class SelfAttention(nn.Module):
    """timm's ``Attention``, written out: a qkv Linear, reshape, permute, unbind into heads, q/k norms (Identity
    unless ``qk_norm``), ``F.scaled_dot_product_attention``, heads merged, an output projection. ``mask``: None,
    "causal" (``is_causal``), "tril" (a boolean mask built in the forward, below the diagonal), "bool" or "additive" (the ``mask``
    argument, a buffer of the caller: a module owning buffers is a leaf of the trace)."""

    def __init__(self, dim, heads, seq, mask=None, qk_norm=False):
        super().__init__()
        self.seq, self.heads, self.head_dim, self.mask_kind = seq, heads, dim // heads, mask
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.mask_kind == "causal":
            x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mask_kind == "tril":
            allowed = torch.ones(self.seq, self.seq, dtype=torch.bool).tril(-1)  # a constant of the trace
            allowed[0, 0] = True
            x = F.scaled_dot_product_attention(q, k, v, allowed)
        elif self.mask_kind == "bool":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.mask_kind == "additive":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.6)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    """A pre-norm transformer block on ``(B, N, d_in)`` tokens: embedding, optional class token, attention and a
    GELU MLP with residuals, mean pooling or the class token, a head with ``classes`` outputs."""

    def __init__(self, d_in=3, dim=8, heads=2, seq=5, mask=None, classes=3, cls_token=False, qk_norm=False):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls_token else None
        n = seq + (1 if cls_token else 0)
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads, n, mask, qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)
        allowed = torch.rand(n, n) > 0.4
        allowed[:, 0] = True  # no fully masked row here (test_fully_masked_rows has those)
        self.register_buffer("mask", allowed if mask == "bool" else torch.randn(1, heads, n, n) if mask == "additive"
                             else None)
        with torch.no_grad():  # norms away from (1, 0), attention logits of order 1
            for m in (self.norm1, self.norm2):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            self.attn.qkv.weight.mul_(3.0)

    def forward(self, x):
        h = self.embed(x)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], 1)
        h = h + self.attn(self.norm1(h), self.mask)
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(h[:, 0] if self.cls is not None else h.mean(1))


def _reference(model, head, x):
    with sdpa_kernel(SDPBackend.MATH):
        return fallback.autograd_penalty(model, head, x).mean()


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Block(**kw).double()


def _check(model, x, call, head, rtol=1e-9):
    x = x.clone().requires_grad_(True)
    value = call(model, x)
    ref = _reference(model, head, x)
    got, want = grads_of(value, model, x), grads_of(ref, model, x)
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-10, atol=0)
    assert_grads_close(got, want, rtol=rtol)
    return max((a - b).norm().item() / max(b.norm().item() for b in want) for a, b in zip(got, want))


MODELS = {
    "plain": dict(seq=5),
    "causal": dict(seq=7, mask="causal"),
    "tril-mask": dict(seq=5, mask="tril", heads=1),
    "bool-mask": dict(seq=5, mask="bool", heads=4),
    "additive-mask": dict(seq=7, mask="additive"),
    "class-token": dict(seq=4, cls_token=True, heads=4),
    "qk-norm": dict(seq=5, qk_norm=True),
}


def test_block_has_no_opaque_nodes():
    for name, kw in MODELS.items():
        program = dbprop.compile_model(_model(**kw))
        assert program.opaque_nodes == [], (name, program.explain())
        assert sum(type(op) is nodes.Attention for op in program.ops) == 1, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize("case", list(MODELS))
def test_jacobian_penalty(case, output, backend):
    model = _model(**MODELS[case])
    x = torch.randn(3, MODELS[case]["seq"], 3, dtype=torch.float64)
    _check(model, x, lambda m, x: Fn.jacobian_penalty(m, x, output=output, backend=backend, strict=True),
           P.JacobianFrobenius(output))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "additive-mask"])
def test_double_backprop_loss(case, backend):
    model = _model(**MODELS[case])
    x = torch.randn(4, MODELS[case]["seq"], 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    _check(model, x, lambda m, x: Fn.double_backprop_loss(m, x, y, 0.7, backend=backend, strict=True),
           P.DoubleBackprop(y, 0.7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "bool-mask", "class-token"])
def test_gradient_penalty(case, backend):
    model = _model(classes=1, **MODELS[case])
    x = torch.randn(3, MODELS[case]["seq"], 3, dtype=torch.float64)
    _check(model, x, lambda m, x: Fn.gradient_penalty(m, x, 1.0, backend=backend, strict=True), P.GradientNorm(1.0))
