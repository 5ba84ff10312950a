"""The native element kernels as dispatcher operators ``torch.ops.dbprop.*``.

Each operator is one row of a table in ``csrc/ops.h`` (name, schema, what it computes), exported as
``dbprop._C.element_operators()``; its schema, checks and CPU / CUDA kernels are registered in C++ (loaded with
``dbprop._C``), and the C++ pass drivers call them through the dispatcher as well. This module holds what the
dispatcher needs from Python and what Python callers use:

* a fake (meta) kernel per operator (:class:`Fakes`), so that the operators can be traced (``torch.compile``,
  ``FakeTensorMode``) and checked with ``torch.library.opcheck``;
* a typed wrapper per operator, made from its schema (:func:`wrapper`; ``native_ops.<name>``): keyword arguments,
  an output named ``r`` is ``None`` unless argument ``want_r`` / ``need_r`` asked for it (the schemas return empty
  tensors), and an operator returning nothing returns the tensor it writes (``Tensor(a!)``).

The operators are the passes' derivative computations and are not differentiable themselves: an argument that
requires grad (grad mode on) is refused; under ``torch.no_grad()`` they run (C++ Autograd kernel, which also bumps
the version of the tensors they write). Call :func:`register_fakes` once after loading the extension
(``dbprop.backends`` does); it refuses an operator without a fake kernel or a fake kernel without an operator.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

def _packed(like: Tensor, numel: int) -> Tensor:
    """The packed bits of ``numel`` elements: one uint8 per 8."""
    return like.new_empty(((numel + 7) // 8,), dtype=torch.uint8)


def _none(like: Tensor) -> Tensor:
    """An output not asked for (empty in the schema)."""
    return like.new_empty((0,))


class Fakes:
    """One fake kernel per element operator, named after it: output shapes, dtypes and devices only."""

    @staticmethod
    def forward_epilogue(z, bias, channels, inner, slope):
        return torch.empty_like(z), _packed(z, z.numel())

    @staticmethod
    def pack_positive(t):
        return _packed(t, t.numel())

    @staticmethod
    def mask_multiply(c, bits, mask_numel, slope):
        return torch.empty_like(c)

    @staticmethod
    def mask_multiply_bias_grad(c, bits, mask_numel, slope, channels, inner):
        return torch.empty_like(c), c.new_empty((channels,))

    @staticmethod
    def softmax_cotangent(probs, directions):
        return torch.empty_like(directions)

    @staticmethod
    def softmax_eta_accumulate(probs, directions, h, eta):
        return None

    @staticmethod
    def penalty_head(xi, x, head, p1, p2, weight, value, want_q0, want_input_grad):
        q0 = torch.empty_like(xi) if want_q0 else _none(xi)
        return q0, xi.new_empty(xi.shape[1:]) if want_input_grad else _none(xi)

    @staticmethod
    def activation_derivative_multiply(c, z, activation, p1, p2):
        return torch.empty_like(c)

    @staticmethod
    def activation_source(xi, q, z, activation, p1, p2):
        return torch.empty_like(z)

    @staticmethod
    def batchnorm_train_linear(q, xhat, scale):
        return torch.empty_like(q)

    @staticmethod
    def batchnorm_train_bbp(xi, q, xhat, invstd, gamma, need_tangent, want_source, want_mixed):
        if not (need_tangent or want_source or want_mixed):
            return _none(q), _none(q), _none(q)
        return (torch.empty_like(q) if need_tangent else _none(q),
                torch.empty_like(xhat) if want_source else _none(q),
                xhat.new_empty(xhat.shape[1:2]) if want_mixed else _none(q))


def fake_kernels() -> Dict[str, Callable]:
    """The fake kernels by operator name."""
    return {name: f for name, f in vars(Fakes).items() if not name.startswith("_")}


def check_fakes(names) -> None:
    """Refuse operator names (the extension's table) that differ from the fake kernels' names."""
    fakes = fake_kernels()
    if set(names) != set(fakes):
        raise ImportError(f"dbprop._C's element operators and the fake kernels of dbprop/native_ops.py differ: "
                          f"without a fake kernel {sorted(set(names) - set(fakes))}, without an operator "
                          f"{sorted(set(fakes) - set(names))}; rebuild it: pip install --no-build-isolation -e .")


_registered = False


def register_fakes(extension: Any) -> None:
    """Register the fake kernels of the loaded extension's operators (once) and make their wrappers; a fake kernel
    missing for an operator of ``extension.element_operators()``, or one without its operator, is refused."""
    global _registered
    if _registered:
        return
    table = extension.element_operators()
    check_fakes([name for name, _, _ in table])
    fakes = fake_kernels()
    for name, _, doc in table:
        torch.library.register_fake(f"dbprop::{name}")(fakes[name])
        globals()[name] = wrapper(name, doc)
    _registered = True


_ANNOTATIONS = {"Tensor": Tensor, "Optional[Tensor]": Optional[Tensor], "int": int, "float": float, "str": str,
                "bool": bool}


def wrapper(name: str, doc: str = "") -> Callable:
    """The typed wrapper of operator ``dbprop::<name>``, made from its schema (see the module docstring)."""
    op = getattr(torch.ops.dbprop, name).default
    schema = op._schema
    args = schema.arguments
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=_ANNOTATIONS.get(str(a.type), str(a.type))) for a in args]
    signature = inspect.Signature(params)
    index = {a.name: i for i, a in enumerate(args)}
    # output i -> the index of the bool argument that asks for it (want_<name> / need_<name>), if any
    asked = [next((index[f + r.name] for f in ("want_", "need_") if f + r.name in index), None)
             for r in schema.returns]
    written = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]

    def call(*a, **kw):
        values = signature.bind(*a, **kw).args
        out = op(*values)
        if not schema.returns:
            return values[written[0]] if len(written) == 1 else tuple(values[i] for i in written) or None
        outs = out if isinstance(out, tuple) else (out,)
        outs = tuple(None if j is not None and not values[j] else o for o, j in zip(outs, asked))
        return outs if isinstance(out, tuple) else outs[0]

    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    call.__signature__ = signature  # type: ignore[attr-defined]
    call.__doc__ = f"{doc}\n\nSchema (csrc/ops.h): ``{schema}``."
    return call

