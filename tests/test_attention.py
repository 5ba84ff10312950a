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


# ---- the operators themselves: (4.22)-(4.26) against autograd, k class copies stacked along the batch
def _operator_errors(shapes, mask=None, causal=False, scale=None, zero=(), k=2):
    torch.manual_seed(1)
    Q, K, V = (torch.randn(s, dtype=torch.float64) for s in shapes)
    B = Q.shape[0]

    def fn(q, kk, v):
        return F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal, scale=scale)

    op = nodes.Attention("attention", lambda xs, values: fn(*xs), lambda values: (mask, 0.0, causal, scale, False))
    y, saved = op.run([Q, K, V], nodes.RunContext(nodes.PythonKernels(), False, False, B))
    tangents = [None if i in zero else torch.randn(k * B, *t.shape[1:], dtype=torch.float64)
                for i, t in enumerate((Q, K, V))]
    xi = torch.randn(k * B, *y.shape[1:], dtype=torch.float64)
    got = [op.tangent(tangents, saved, None), *op.cotangent(xi, saved, None), *op.source(xi, tangents, saved, None)]
    with sdpa_kernel(SDPBackend.MATH):
        ins = [t.clone().requires_grad_(True) for t in (Q, K, V)]
        out = fn(*ins)
        assert torch.equal(out, y)
        tan, cot, src = [], [], [torch.zeros_like(t) for t in ins]
        for c in range(k):
            rows = slice(c * B, (c + 1) * B)
            xc = xi[rows].clone().requires_grad_(True)
            u = torch.autograd.grad(out, ins, xc, create_graph=True)       # Aᵀ ξ at (Q, K, V)
            cot.append(u)
            bilinear = sum((a * t[rows]).sum() for a, t in zip(u, tangents) if t is not None)
            g = torch.autograd.grad(bilinear, [xc, *ins], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
            tan.append(g[0])                                                 # A q
            src = [s + d for s, d in zip(src, g[1:])]                       # ∂_y ⟨ξ, A(y) q⟩
    want = [torch.cat(tan), *(torch.cat([u[i] for u in cot]) for i in range(3)), *src]
    errors = []
    for a, b in zip(got, want):
        if a is None:
            assert b.abs().max() == 0
            continue
        errors.append(((a - b).abs().max() / b.abs().max()).item())
    return max(errors)


MASK = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.4
MASK[3] = False  # a fully masked row: torch's math backend gives 0 there, and so do the operators


@pytest.mark.parametrize("case", [
    dict(shapes=[(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)]),
    dict(shapes=[(2, 5, 4), (2, 7, 4), (2, 7, 3)], scale=0.7),                         # no head dimension
    dict(shapes=[(3, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 3)], causal=True),
    dict(shapes=[(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)], mask=MASK),
    dict(shapes=[(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)],
         mask=torch.randn(2, 1, 5, 7, dtype=torch.float64)),                            # additive, per sample
    dict(shapes=[(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)], zero=(0,)),
    dict(shapes=[(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)], zero=(2,)),
    dict(shapes=[(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)], zero=(0, 1), k=3),
], ids=["heads", "no-heads", "causal", "bool-mask-full-row", "additive", "no-q", "no-v", "v-only"])
def test_operators_match_autograd(case):
    assert _operator_errors(**case) < 1e-13


def test_row_identities_for_a_tiled_kernel():
    """docs/maths.md §4.17: δ = rowsum(P ⊙ D) = rowsum(ξ ⊙ O), ṖV = (P ⊙ Ṡ)V − σ̇ O, rowsum(P ⊙ g) = rowsum(ξ ⊙ Aq)."""
    torch.manual_seed(2)
    Q, K, V = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 7, 4, dtype=torch.float64), \
        torch.randn(3, 7, 6, dtype=torch.float64)
    qd, kd, vd, xi = torch.randn_like(Q), torch.randn_like(K), torch.randn_like(V), torch.randn(3, 5, 6).double()
    s, M = 0.6, torch.randn(5, 7, dtype=torch.float64)
    M[:, 2] = -math.inf
    P = torch.softmax(s * Q @ K.mT + M, -1)
    O = P @ V
    Sd = s * (qd @ K.mT + Q @ kd.mT)
    sd = (P * Sd).sum(-1, keepdim=True)
    Od = (P * (Sd - sd)) @ V + P @ vd                                   # (4.22)
    D = xi @ V.mT
    delta = (xi * O).sum(-1, keepdim=True)
    g = (D - delta) * (Sd - sd) + xi @ vd.mT                             # (4.25)
    torch.testing.assert_close((P * D).sum(-1, keepdim=True), delta, rtol=0, atol=1e-14)
    torch.testing.assert_close((P * Sd) @ V - sd * O + P @ vd, Od, rtol=0, atol=1e-14)
    torch.testing.assert_close((P * g).sum(-1), (xi * Od).sum(-1), rtol=0, atol=1e-14)


# ---- more models: a fully masked row, a learned query, grouped-query attention with equal heads, opaque masks
class MaskedRows(nn.Module):
    """A boolean mask (a buffer of the root) with a fully masked query row, no head dimension."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 2)
        allowed = torch.rand(5, 5, generator=torch.Generator().manual_seed(2)) > 0.3
        allowed[1] = False
        self.register_buffer("allowed", allowed)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = torch.tanh(x)
        y = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(x), attn_mask=self.allowed)
        return self.head(F.gelu(y).flatten(1))


class LearnedQuery(nn.Module):
    """Attention pooling: a learned query per head, a parameter of batch size 1 (broadcast) or expanded to the
    batch (a parameter function), keys and values from the tokens, ``enable_gqa`` with equal head counts."""

    def __init__(self, expand):
        super().__init__()
        self.expand = expand
        self.query = nn.Parameter(torch.randn(1, 2, 1, 3))
        self.kv = nn.Linear(4, 12)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        B, N, _ = x.shape
        k, v = self.kv(x).reshape(B, N, 2, 2, 3).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.query.expand(B, -1, -1, -1) if self.expand else self.query
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.head(y.flatten(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,shape", [(MaskedRows, (5, 3)), (lambda: LearnedQuery(False), (5, 4)),
                                        (lambda: LearnedQuery(True), (7, 4))],
                         ids=["fully-masked-row", "learned-query", "learned-query-expanded"])
def test_more_models(make, shape, backend):
    torch.manual_seed(4)
    model = make().double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    assert dbprop.compile_model(model).opaque_nodes == []
    _check(model, x, lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend=backend, strict=True),
           P.JacobianFrobenius("softmax"))


class InputMask(nn.Module):
    """An additive mask computed from ``x``: the call stays an opaque node (local autograd, on the math
    backend), exact."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.m = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        mask = torch.tanh(self.m(x)).unsqueeze(1)
        h = F.scaled_dot_product_attention(self.q(x).unsqueeze(1), self.k(x).unsqueeze(1), self.v(x).unsqueeze(1),
                                           attn_mask=mask)
        return self.head(h.flatten(1))


def test_mask_depending_on_x_stays_opaque():
    torch.manual_seed(6)
    model = InputMask().double()
    program = dbprop.compile_model(model)
    assert [program.ops[n].kind for n in program.opaque_nodes] == ["opaque"]
    assert not any(isinstance(op, nodes.Attention) for op in program.ops)
    _check(model, torch.randn(3, 5, 4, dtype=torch.float64),
           lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend="python", strict=True),
           P.JacobianFrobenius("softmax"))


# ---- timm's Attention (written inline, timm is not imported) and what is refused
class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (fused_attn path) as timm writes it."""

    def __init__(self, dim, num_heads=2, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmBlock(nn.Module):
    def __init__(self, attn_drop=0.0):
        super().__init__()
        self.embed, self.norm = nn.Linear(3, 8), nn.LayerNorm(8)
        self.attn = TimmAttention(8, 2, qkv_bias=True, attn_drop=attn_drop)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-p0"])
def test_timm_attention_runs_natively(train, backend):
    torch.manual_seed(8)
    model = TimmBlock(attn_drop=0.0 if train else 0.25).double().train(train)
    program = dbprop.compile_model(model)
    assert program.opaque_nodes == [] and sum(op.kind == "attention" for op in program.ops) == 1
    _check(model, torch.randn(3, 7, 3, dtype=torch.float64),
           lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend=backend, strict=True),
           P.JacobianFrobenius("softmax"))


def test_attention_dropout_in_train_mode_is_refused():
    model = TimmBlock(attn_drop=0.25).double().train()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"dropout_p=0\.25.*dbprop needs dropout_p=0"):
        dbprop.compile_model(model)
    with pytest.raises(UnsupportedModelError, match="dropout_p"):
        Fn.jacobian_penalty(model, x, strict=True)
    with pytest.warns(dbprop.FallbackWarning, match="dropout_p"):  # not strict: autograd instead, with a warning
        Fn.jacobian_penalty(model, x)


class InputMaskDropout(InputMask):
    def forward(self, x):
        mask = torch.tanh(self.m(x)).unsqueeze(1)
        h = F.scaled_dot_product_attention(self.q(x).unsqueeze(1), self.k(x).unsqueeze(1), self.v(x).unsqueeze(1),
                                           attn_mask=mask, dropout_p=0.1)
        return self.head(h.flatten(1))


def test_attention_dropout_is_refused_also_where_the_call_would_be_opaque():
    with pytest.raises(UnsupportedModelError, match=r"dropout_p=0\.1"):
        dbprop.compile_model(InputMaskDropout())


class GroupedQuery(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 4)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, 4, 2).transpose(1, 2)
        k = self.kv(x).reshape(B, N, 2, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return self.head(y.flatten(1))


def test_grouped_query_attention_is_refused():
    model = GroupedQuery().double()
    with pytest.raises(UnsupportedModelError, match="grouped-query"):
        Fn.jacobian_penalty(model, torch.randn(3, 5, 4, dtype=torch.float64), strict=True)


def test_the_autograd_fallback_runs_attention_on_the_math_backend():
    """A refused model with causal attention falls back to autograd, which must not pick torch's fused CPU
    kernel (it has no double backward): the fallback runs the model on the math backend."""
    model = _model(**MODELS["causal"])
    model.norm1.register_forward_hook(lambda m, i, o: o)  # hooks are refused: the penalty falls back
    x = torch.randn(3, 7, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(dbprop.FallbackWarning, match="hook"):
        value = Fn.jacobian_penalty(model, x, output="softmax")
    ref = _reference(model, P.JacobianFrobenius("softmax"), x)
    torch.testing.assert_close(value.detach(), ref.detach(), rtol=1e-12, atol=0)
    assert_grads_close(grads_of(value, model, x), grads_of(ref, model, x), rtol=1e-9)


# ---- nn.MultiheadAttention: expanded into traced calls (in-projection, heads, SDPA, out_proj), all native
class MHABlock(nn.Module):
    """Tokens ``(B, N, 3)`` embedded, an ``nn.MultiheadAttention`` with a residual, mean pooling, a head.

    ``kind``: "self" (``mha(h, h, h, need_weights=False)``, torchvision's EncoderBlock), "weights-ignored" (the
    default ``need_weights=True``, the weights unpacked and unused), "cross" (query from ``h``, key and value one
    other tensor), "qkv" (three different tensors), "seq-first" (``batch_first=False``, the inputs
    ``h.transpose(0, 1)``, the output transposed back). ``mask``: None, "bool" (an ``(L, S)`` boolean
    ``attn_mask``, True where not attended), "float" (an additive ``(B·H, L, S)`` one), "padding" (a boolean
    ``key_padding_mask``), "padding+bool", "causal" (``is_causal`` with a causal ``attn_mask``), buffers of the
    root. ``mha``: keyword arguments of the module."""

    def __init__(self, kind="self", mask=None, seq=5, batch=3, heads=2, dim=8, classes=3, **mha):
        super().__init__()
        self.kind, self.mask_kind = kind, mask
        self.embed = nn.Linear(3, dim)
        self.other = nn.Linear(3, mha.get("kdim", dim))
        self.third = nn.Linear(3, mha.get("vdim", dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=kind != "seq-first", **mha)
        self.head = nn.Linear(dim, classes)
        g = torch.Generator().manual_seed(3)
        allowed = torch.rand(seq, seq, generator=g) > 0.4
        allowed[:, 0] = True
        padding = torch.zeros(batch, seq, dtype=torch.bool)
        padding[0, 3:], padding[2, 1] = True, True
        self.register_buffer("attn_mask", ~allowed if mask in ("bool", "padding+bool") else
                             torch.randn(batch * heads, seq, seq, generator=g).double() if mask == "float" else
                             torch.ones(seq, seq, dtype=torch.bool).triu(1) if mask == "causal" else None)
        self.register_buffer("padding", padding if mask in ("padding", "padding+bool") else None)
        with torch.no_grad():  # attention logits of order 1
            self.attn.in_proj_weight.mul_(3.0) if self.attn.in_proj_weight is not None else None

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        masks = dict(attn_mask=self.attn_mask, key_padding_mask=self.padding, is_causal=self.mask_kind == "causal")
        if self.kind == "self":
            a, _ = self.attn(h, h, h, need_weights=False, **masks)
        elif self.kind == "weights-ignored":
            a, _ = self.attn(h, h, h, **masks)
        elif self.kind == "cross":
            m = self.other(x)
            a = self.attn(h, m, m, need_weights=False, **masks)[0]
        elif self.kind == "qkv":
            a = self.attn(h, self.other(x), self.third(x), need_weights=False, **masks)[0]
        else:  # sequence first
            t = h.transpose(0, 1)
            a = self.attn(t, t, t, need_weights=False, **masks)[0].transpose(0, 1)
        return self.head((h + a).mean(1))


MHA_MODELS = {
    "self": dict(),
    "weights-ignored": dict(kind="weights-ignored"),
    "cross": dict(kind="cross"),
    "qkv": dict(kind="qkv"),
    "qkv-kdim-vdim": dict(kind="qkv", kdim=5, vdim=6),
    "seq-first": dict(kind="seq-first"),
    "no-bias": dict(bias=False),
    "bool-mask": dict(mask="bool"),
    "float-mask": dict(mask="float", heads=4),
    "padding": dict(mask="padding"),
    "padding+bool": dict(kind="seq-first", mask="padding+bool"),
    "causal": dict(mask="causal", kind="weights-ignored"),
    "dropout-eval": dict(dropout=0.3),
}


def _mha(seed=0, train=True, **kw):
    torch.manual_seed(seed)
    dropout = kw.get("dropout", 0.0)
    return MHABlock(**kw).double().train(train and dropout == 0.0)


def test_mha_has_no_opaque_nodes():
    for name, kw in MHA_MODELS.items():
        program = dbprop.compile_model(_mha(**kw))
        assert program.opaque_nodes == [], (name, program.explain())
        assert sum(type(op) is nodes.Attention for op in program.ops) == 1, name
        assert {p for p in program.parameters()} >= {p for p in program.model.attn.parameters()}, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize("case", list(MHA_MODELS))
def test_mha_jacobian_penalty(case, output, backend):
    model = _mha(**MHA_MODELS[case])
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    _check(model, x, lambda m, x: Fn.jacobian_penalty(m, x, output=output, backend=backend, strict=True),
           P.JacobianFrobenius(output))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self", "qkv-kdim-vdim", "seq-first", "padding+bool"])
def test_mha_double_backprop_loss(case, backend):
    model = _mha(**MHA_MODELS[case])
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    _check(model, x, lambda m, x: Fn.double_backprop_loss(m, x, y, 0.7, backend=backend, strict=True),
           P.DoubleBackprop(y, 0.7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self", "cross", "float-mask", "causal"])
def test_mha_gradient_penalty(case, backend):
    model = _mha(classes=1, **MHA_MODELS[case])
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    _check(model, x, lambda m, x: Fn.gradient_penalty(m, x, 1.0, backend=backend, strict=True), P.GradientNorm(1.0))


class MHAKept(MHABlock):
    """What stays one opaque node (local autograd on the math backend, exact): ``add_bias_kv`` /
    ``add_zero_attn``; ``kind="weights-used"``: the attention weights read by the caller (refused)."""

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        a, w = self.attn(h, h, h)
        if self.kind == "weights-used":
            a = a + w.sum(-1, keepdim=True)
        return self.head((h + a).mean(1))


@pytest.mark.parametrize("kw", [dict(add_bias_kv=True), dict(add_zero_attn=True)],
                         ids=["add-bias-kv", "add-zero-attn"])
def test_mha_kept_whole_is_exact(kw):
    torch.manual_seed(5)
    model = MHAKept(**kw).double()
    program = dbprop.compile_model(model)
    assert [program.ops[n].name for n in program.opaque_nodes] == ["attn"]
    _check(model, torch.randn(3, 5, 3, dtype=torch.float64),
           lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend="python", strict=True),
           P.JacobianFrobenius("softmax"))


def test_mha_weights_read_are_refused():
    torch.manual_seed(5)
    model = MHAKept(kind="weights-used").double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="attn returns tuple"):
        Fn.jacobian_penalty(model, x, strict=True)
    with pytest.warns(dbprop.FallbackWarning):  # not strict: autograd instead, with a warning
        Fn.jacobian_penalty(model, x)


class MHAInputPadding(MHABlock):
    """An additive key padding mask computed from ``x``: the attention call stays opaque (math backend), exact;
    the projections stay native."""

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        a, _ = self.attn(h, h, h, key_padding_mask=-F.softplus(self.other(x)[..., 0]), need_weights=False)
        return self.head((h + a).mean(1))


def test_mha_padding_depending_on_x_stays_opaque():
    torch.manual_seed(6)
    model = MHAInputPadding().double()
    program = dbprop.compile_model(model)
    assert not any(isinstance(op, nodes.Attention) for op in program.ops)
    assert sum(op.kind == "affine" for op in program.ops) == 5  # embed, other, in_proj, out_proj, head
    _check(model, torch.randn(3, 5, 3, dtype=torch.float64),
           lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend="python", strict=True),
           P.JacobianFrobenius("softmax"))


class MHABooleanPadding(MHABlock):
    """A boolean key padding mask computed from ``x`` (no derivative flows through it): opaque, exact."""

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        a, _ = self.attn(h, h, h, key_padding_mask=self.other(x)[..., 0] > 1.0, need_weights=False)
        return self.head((h + a).mean(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_boolean_mask_computed_from_x_is_exact(backend):
    torch.manual_seed(6)
    model = MHABooleanPadding().double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        x[0, 1:3] += 4.0  # some keys of sample 0 masked (never a whole row)
    _check(model, x, lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend=backend, strict=True),
           P.JacobianFrobenius("softmax"))


def test_mha_dropout_in_train_mode_is_refused():
    torch.manual_seed(0)
    model = MHABlock(dropout=0.25).double().train()
    with pytest.raises(UnsupportedModelError, match=r"dropout_p=0\.25.*dbprop needs dropout_p=0"):
        dbprop.compile_model(model)


def test_mha_forward_matches_the_module_in_float32():
    """The expansion reproduces the module (its fused fast path in eval mode included) to float32 tolerance."""
    for kind in ("self", "seq-first"):
        torch.manual_seed(9)
        model = MHABlock(kind=kind, mask="padding").eval()
        x = torch.randn(3, 5, 3)
        with torch.no_grad():
            want = model(x)
        value = Fn.jacobian_penalty(model, x, output="softmax", strict=True)  # runs the self-check
        assert torch.isfinite(value)
        program = dbprop.compile_model(model)
        from dbprop.passes import Passes
        with torch.no_grad():
            got = Passes(program.ir, nodes.PythonKernels()).forward(x, keep_inputs=False).output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 8), nn.Linear(8, 3)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def test_modules_kept_whole_attend_on_the_math_backend():
    """``nn.TransformerEncoderLayer`` (torch's own forward, no node kind) is one opaque node; its local autograd
    runs on the math backend (the fused CPU kernel has no double backward), so it is exact."""
    torch.manual_seed(7)
    model = EncoderLayer().double()
    program = dbprop.compile_model(model)
    assert [program.ops[n].name for n in program.opaque_nodes] == ["layer"]
    _check(model, torch.randn(3, 5, 3, dtype=torch.float64),
           lambda m, x: Fn.jacobian_penalty(m, x, output="softmax", backend="python", strict=True),
           P.JacobianFrobenius("softmax"))
