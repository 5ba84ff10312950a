"""The contenders: each computes a penalty of the mean over the batch and its parameter gradients (``.grad``).

(a) autograd, one backward on the summed per-class penalty; (b) autograd, one backward per class;
(c) torch.func (vmap over one-hot cotangents of vjp, then grad), optionally chunked; (d) random projections
written the way facebookresearch/jacobian_regularizer does it; (e)/(f) dbprop python / native backends;
(g) classical double backprop, autograd versus DoubleBackpropLoss; (h) one plain training step.
"""
import copy
import weakref

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp, vmap

import dbprop


def _out(model, x, output):
    o = model(x)
    return torch.softmax(o, -1) if output == "softmax" else o


def autograd_sum(model, x, y, output, C):
    x = x.detach().requires_grad_(True)
    out = _out(model, x, output)
    total = 0.0
    for i in range(C):
        g = torch.autograd.grad(out[:, i].sum(), x, create_graph=True)[0]
        total = total + g.pow(2).sum()
    (total / x.shape[0]).backward()


def autograd_per_class(model, x, y, output, C):
    x = x.detach().requires_grad_(True)
    out = _out(model, x, output)
    for i in range(C):
        g = torch.autograd.grad(out[:, i].sum(), x, create_graph=True)[0]
        (g.pow(2).sum() / x.shape[0]).backward(retain_graph=i < C - 1)


def func_vmap(model, x, y, output, C, chunk_size=None):
    params = {k: v.detach() for k, v in model.named_parameters()}
    B = x.shape[0]

    def penalty(params, x):
        def f(x):
            o = functional_call(model, params, (x,))
            return torch.softmax(o, -1) if output == "softmax" else o
        _, vjp_fn = vjp(f, x)
        cotangents = torch.eye(C, dtype=x.dtype, device=x.device)[:, None, :].expand(C, B, C)
        (J,) = vmap(vjp_fn, chunk_size=chunk_size)(cotangents)
        return J.pow(2).sum() / B

    grads = grad(penalty)(params, x)
    for name, p in model.named_parameters():
        p.grad = grads[name] if p.grad is None else p.grad + grads[name]


def jacreg(model, x, y, output, C, n_proj=1):
    """facebookresearch/jacobian_regularizer: per projection a VJP with create_graph, ‖J‖²_F ≈ C·‖Jᵀv‖²."""
    x = x.detach().requires_grad_(True)
    out = _out(model, x, output)
    B = x.shape[0]
    J2 = 0.0
    for _ in range(n_proj):
        v = torch.randn(B, C, dtype=x.dtype, device=x.device)
        v = v / v.norm(dim=1, keepdim=True)
        Jv = torch.autograd.grad(out, x, v, create_graph=True)[0]
        J2 = J2 + C * Jv.pow(2).sum() / (n_proj * B)
    J2.backward()


def dbprop_jacobian(model, x, y, output, C, backend="python", chunk_size=None, estimator="exact", n_proj=1):
    dbprop.functional.jacobian_penalty(model, x, output=output, estimator=estimator, num_projections=n_proj,
                                       chunk_size=chunk_size, backend=backend).backward()


def under_autocast(fn, dtype=torch.bfloat16):
    """``fn`` inside ``torch.autocast`` on the input's device (the penalty's policy: README, Mixed precision)."""
    def step(model, x, y, output, C):
        with torch.autocast(x.device.type, dtype=dtype):
            fn(model, x, y, output, C)
    return step


_shadows: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def dbprop_jacobian_low_precision(model, x, y, output, C, dtype=torch.bfloat16):
    """The alternative autocast policy, measured to choose between them: the passes computed in ``dtype`` (a
    ``dtype`` copy of the model refreshed from the float32 parameters each step, float32 accumulation inside the
    kernels), gradients cast back to float32."""
    shadow = _shadows.get(model)
    if shadow is None:
        shadow = _shadows[model] = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for p, q in zip(model.parameters(), shadow.parameters()):
            q.copy_(p)
    for q in shadow.parameters():
        q.grad = None
    dbprop.functional.jacobian_penalty(shadow, x.to(dtype), output=output).backward()
    for p, q in zip(model.parameters(), shadow.parameters()):
        p.grad = q.grad.float() if p.grad is None else p.grad + q.grad.float()


def autograd_output_gradient(model, x, y, output, C):
    x = x.detach().requires_grad_(True)
    out = _out(model, x, output)
    g = torch.autograd.grad(out.gather(1, y[:, None]).sum(), x, create_graph=True)[0]
    (g.pow(2).sum() / x.shape[0]).backward()


def dbprop_output_gradient(model, x, y, output, C, backend="native"):
    dbprop.functional.output_gradient_penalty(model, x, y, output=output, backend=backend).backward()


DBP_WEIGHT = 0.1


def autograd_double_backprop(model, x, y, output, C):
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="none")
    g = torch.autograd.grad(loss.sum(), x, create_graph=True)[0]
    (loss + DBP_WEIGHT * g.pow(2).flatten(1).sum(1)).mean().backward()


def dbprop_double_backprop(model, x, y, output, C, backend="native"):
    dbprop.functional.double_backprop_loss(model, x, y, DBP_WEIGHT, backend=backend).backward()


def plain_step(model, x, y, output, C):
    F.cross_entropy(model(x), y).backward()
