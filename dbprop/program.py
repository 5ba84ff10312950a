"""The model program: an ``nn.Module`` turned into the chain of stage ops of DESIGN.md §1."""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
from torch import Tensor, nn

from . import operators as ops
from .errors import UnsupportedModelError

_SUPPORTED_NAMES = ", ".join(sorted(t.__name__ for t in ops.SUPPORTED)) + " (nested nn.Sequential allowed)"


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers (their ``.module`` holds the parameters)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _leaves(module: nn.Module, name: str) -> Iterator[Tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            yield from _leaves(child, f"{name}.{child_name}" if name else child_name)
    else:
        yield name or type(module).__name__, module


class Program:
    """A compiled stage program: ``ops`` in execution order, reading the model's live parameters."""

    def __init__(self, model: nn.Module, op_list: List[ops.Op]) -> None:
        self.model = model
        self.ops = op_list
        self._native = None  # the dbprop._C.Program, built on first use (holds the live tensors)
        self.affine_indices = [i for i, op in enumerate(op_list) if isinstance(op, ops.Affine)]
        if not self.affine_indices:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no Linear or Conv layer; dbprop needs at least one")

    @property
    def first_affine(self) -> int:
        return self.affine_indices[0]

    @property
    def last_affine(self) -> int:
        return self.affine_indices[-1]

    def parameters(self) -> List[Tensor]:
        """Weights and biases of the affine ops, in program order (the autograd Function's inputs)."""
        return [p for i in self.affine_indices for p in self.ops[i].parameters()]

    def native(self):
        """The program as a ``dbprop._C.Program`` (descriptors plus the live weight and bias tensors)."""
        if self._native is None:
            from .backends import native_module
            affine = [self.ops[i] for i in self.affine_indices]
            self._native = native_module().Program([op.descriptor() for op in self.ops], [op.weight for op in affine],
                                                   [op.bias for op in affine])
        return self._native

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if ``x`` cannot be fed to the program."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        w = self.ops[self.first_affine].weight
        if x.dtype != w.dtype:
            raise TypeError(f"dtype mismatch: input is {x.dtype} but the model's parameters are {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"device mismatch: input is on {x.device} but the model is on {w.device}")
        if x.dim() < 2:
            raise ValueError(f"input must be batched, shape (batch, ...); got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: the input has batch size 0")
        first = self.ops[self.first_affine]
        if self.first_affine == 0 or all(isinstance(o, (ops.Identity, ops.Dropout, ops.Activation))
                                          for o in self.ops[:self.first_affine]):
            if isinstance(first, ops.Conv):
                want = first.dim + 2
                if x.dim() != want:
                    raise ValueError(f"{first.name} ({type(first.module).__name__}) expects input of shape "
                                     f"(batch, {first.in_features()}, {'L' if first.dim == 1 else 'H, W'}); "
                                     f"got shape {tuple(x.shape)}")
                if x.shape[1] != first.in_features():
                    raise ValueError(f"{first.name} expects {first.in_features()} input channels; "
                                     f"got shape {tuple(x.shape)}")
            elif x.shape[-1] != first.in_features():
                raise ValueError(f"{first.name} (Linear) expects {first.in_features()} input features in the "
                                 f"last dimension; got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("input contains non-finite values (inf or nan)")

    def __repr__(self) -> str:
        body = "\n".join(f"  {i}: {op!r}" for i, op in enumerate(self.ops))
        return f"Program(\n{body}\n)"


def compile_model(model: nn.Module) -> Program:
    """Turn a supported ``nn.Module`` into its stage program.

    Supported: ``nn.Sequential`` (nested too) of {supported}. The program holds references to the modules,
    never copies of their parameters. ``DistributedDataParallel``/``DataParallel`` wrappers are unwrapped.

    Raises:
        UnsupportedModelError: naming the first unsupported module, its position and the supported set.
    """
    model = _unwrap(model)
    op_list: List[ops.Op] = []
    for position, (name, module) in enumerate(_leaves(model, "")):
        cls = ops.SUPPORTED.get(type(module))
        if cls is None:
            hint = ""
            if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
                hint = " (drop the final softmax and pass output='softmax' to the penalty instead)"
            elif not isinstance(model, nn.Sequential) and position == 0:
                hint = " (dbprop compiles nn.Sequential models; express the network as one)"
            raise UnsupportedModelError(
                f"unsupported module {type(module).__name__} at position {position} ('{name}'){hint}; "
                f"supported: {_SUPPORTED_NAMES}")
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
            raise UnsupportedModelError(
                f"{type(module).__name__} at position {position} ('{name}') uses padding_mode="
                f"'{module.padding_mode}'; only 'zeros' is supported")
        op_list.append(cls(module, name))
    return Program(model, op_list)


compile_model.__doc__ = compile_model.__doc__.format(supported=_SUPPORTED_NAMES)
