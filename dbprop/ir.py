"""The program's IR: an immutable DAG of nodes (docs/maths.md §1, §3.1) and the traced calls it evaluates.

Node ``n`` is ``ops[n]`` (a kind of :mod:`dbprop.nodes`), reading the values of ``args[n]`` (node indices,
``INPUT`` for ``x``). ``steps`` are every traced call in the order ``forward`` made them: node calls and meta
calls (sizes, constants, attributes) whose values later calls read. Everything is fixed at construction
(tuples; the dataclass is frozen), so one IR serves any number of concurrent or nested passes: the values of
a forward pass live in the pass (:meth:`dbprop.passes.Passes.forward`), never here. The front-end that
builds an IR from a model is :mod:`dbprop.program`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch.fx as fx
from torch import Tensor, nn

from . import nodes as N
from . import parametrized
from .errors import UnsupportedModelError

INPUT = -1  # the program input in a node's argument list

_NO_VALUES: Mapping[fx.Node, Any] = MappingProxyType({})


@dataclass(frozen=True, eq=False)
class TracedCall:
    """One call recorded by torch.fx, evaluated on values given per evaluation (no state of its own).

    ``fn`` is the module (``call_module``), the function (``call_function``) or a reader of the attribute
    (``get_attr``, looked up live); ``call_method`` calls ``node.target`` on its first argument. ``inputs``
    are the traced tensors that the caller passes as ``tensors``; every other traced argument is read from
    ``values`` (the forward pass's values so far: sizes, constants).
    """

    node: fx.Node
    fn: Optional[Callable[..., Any]]
    inputs: Tuple[fx.Node, ...] = ()

    def __call__(self, tensors: Sequence[Tensor] = (), values: Mapping[fx.Node, Any] = _NO_VALUES) -> Any:
        given = dict(zip(self.inputs, tensors))

        def value(n: fx.Node) -> Any:
            return given[n] if n in given else values[n]

        node = self.node
        if node.op == "get_attr":
            return self.fn()
        args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.fn(*args, **kwargs)


@dataclass(frozen=True, eq=False)
class Step:
    """One traced call in order: ``op`` is its node index, ``None`` for a meta call."""

    call: TracedCall
    op: Optional[int] = None

    @property
    def node(self) -> fx.Node:
        return self.call.node


def _traced_inputs(node: fx.Node) -> Tuple[fx.Node, ...]:
    found: list = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return tuple(found)


@dataclass(frozen=True, eq=False)
class IR:
    """A DAG program. ``ops[n]`` reads ``args[n]``; ``output`` is the node whose value (flattened to
    ``(batch, outputs)``) the penalties see; ``placeholder`` is the traced ``x``. The other fields are derived:

    * ``op_nodes[n]``          the traced call of node ``n``;
    * ``consumers[n]``         the nodes reading node ``n`` (``input_consumers``: those reading ``x``);
    * ``depends_on_input[n]``  whether node ``n`` depends on ``x`` (the others are constants for every
      derivative: parameter leaves and their functions), ``args_per_sample[n]`` the same per argument of node
      ``n``, ``reaches_output[n]`` whether the output depends on it;
    * ``last_use[i]``          the traced values no step after step ``i`` reads (a forward pass frees them;
      ``x`` and the output are kept);
    * ``params``, ``param_index[n]``  every parameter the nodes read, once each (shared modules: gradients
      are summed), and the positions in it of node ``n``'s ``op.params()``; ``param_sources[i]`` is
      ``(module, name)`` where ``params[i]`` is a parametrized tensor (its value at compile time; each call
      reads and pins its own, dbprop/parametrized.py), else ``None``.
    """

    name: str                                   # the model's class name
    placeholder: fx.Node
    steps: Tuple[Step, ...]
    ops: Tuple[N.Op, ...]
    args: Tuple[Tuple[int, ...], ...]
    output: int
    op_nodes: Tuple[fx.Node, ...] = field(init=False)
    consumers: Tuple[Tuple[int, ...], ...] = field(init=False)
    input_consumers: Tuple[int, ...] = field(init=False)
    depends_on_input: Tuple[bool, ...] = field(init=False)
    args_per_sample: Tuple[Tuple[bool, ...], ...] = field(init=False)
    reaches_output: Tuple[bool, ...] = field(init=False)
    last_use: Tuple[Tuple[fx.Node, ...], ...] = field(init=False)
    params: Tuple[Tensor, ...] = field(init=False)
    param_sources: Tuple[Optional[Tuple[nn.Module, str]], ...] = field(init=False)
    param_index: Tuple[Tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        put("steps", tuple(self.steps))
        put("ops", tuple(self.ops))
        put("args", tuple(tuple(a) for a in self.args))
        put("op_nodes", tuple(s.node for s in self.steps if s.op is not None))
        consumers: list = [[] for _ in self.ops]
        input_consumers: list = []
        for n, a in enumerate(self.args):
            for m in a:
                (input_consumers if m == INPUT else consumers[m]).append(n)
        put("consumers", tuple(map(tuple, consumers)))
        put("input_consumers", tuple(input_consumers))
        depends: list = []
        for a in self.args:
            depends.append(any(m == INPUT or depends[m] for m in a))
        put("depends_on_input", tuple(depends))
        put("args_per_sample", tuple(tuple(m == INPUT or depends[m] for m in a) for a in self.args))
        reaches = [False] * len(self.ops)
        reaches[self.output] = True
        for n in reversed(range(len(self.ops))):
            reaches[n] = reaches[n] or any(reaches[c] for c in consumers[n])
        put("reaches_output", tuple(reaches))
        keep = {self.placeholder, self.op_nodes[self.output]}
        seen, last_use = set(keep), []
        for step in reversed(self.steps):
            frees = [a for a in dict.fromkeys(_traced_inputs(step.node)) if a not in seen]
            seen.update(frees)
            last_use.append(tuple(frees))
        put("last_use", tuple(reversed(last_use)))
        params: list = []
        sources: list = []
        ids: dict = {}
        index = []
        for op in self.ops:
            ps = op.params()
            for p, src in zip(ps, op.param_sources()):
                key = id(p) if src is None else (id(src[0]), src[1])
                if key not in ids:
                    ids[key] = len(params)
                    params.append(p)
                    sources.append(src)
            index.append(tuple(ids[id(p) if src is None else (id(src[0]), src[1])]
                               for p, src in zip(ps, op.param_sources())))
        put("params", tuple(params))
        put("param_sources", tuple(sources))
        put("param_index", tuple(index))

    # ---- queries
    @property
    def output_node(self) -> fx.Node:
        return self.op_nodes[self.output]

    def parameters(self) -> list:
        """Every parameter the nodes read, once each (shared modules: gradients are summed); a parametrized
        tensor as the call's pinned value where one is pinned."""
        if not self.parametrized:
            return list(self.params)
        return [p if src is None else parametrized.tensor(*src) for p, src in zip(self.params, self.param_sources)]

    @property
    def parametrized(self) -> bool:
        """Whether some node reads a parametrized tensor."""
        return any(src is not None for src in self.param_sources)

    @property
    def opaque_nodes(self) -> list:
        return [n for n, op in enumerate(self.ops) if not op.native]

    @property
    def has_sources(self) -> bool:
        """Whether some node has a second-order source (then the forward-backward pass always runs)."""
        return any(op.has_source for op in self.ops)

    @property
    def is_chain(self) -> bool:
        return all(a == (n - 1 if n else INPUT,) for n, a in enumerate(self.args)) and \
            self.output == len(self.ops) - 1

    @property
    def native_chain(self) -> bool:
        """A chain of the kinds the native chain driver (csrc/passes.cpp) runs in one call per pass."""
        return self.is_chain and all(op.descriptor() is not None for op in self.ops) and \
            any(isinstance(op, N.Affine) for op in self.ops)

    def explain(self) -> str:
        """One line per node: index, kind, where it came from, its inputs and whether it runs natively."""
        lines = [f"Program of {self.name}: {len(self.ops)} nodes, {len(self.opaque_nodes)} opaque"
                 + (", native chain driver" if self.native_chain else "")]
        for n, (op, a) in enumerate(zip(self.ops, self.args)):
            ins = ", ".join("x" if m == INPUT else str(m) for m in a)
            how = "native" if op.native else "opaque (local autograd)"
            out = "  -> output" if n == self.output else ""
            lines.append(f"  {n:3d} {op.kind:<16} {op.name:<32} ({ins}) {how}{out}")
        return "\n".join(lines)

    __repr__ = explain


def as_output_matrix(o: Tensor) -> Tensor:
    """The model output as ``(batch, outputs)``: ``(B,)``, ``(B, C)`` and ``(B, C, 1, ..., 1)`` are accepted."""
    if not isinstance(o, Tensor):
        raise UnsupportedModelError(f"the model must return a tensor, got {type(o).__name__}")
    if o.dim() == 1:
        return o.unsqueeze(1)
    if o.dim() >= 2 and all(s == 1 for s in o.shape[2:]):
        return o.reshape(o.shape[0], o.shape[1])
    raise ValueError(f"the model output must have shape (batch,), (batch, outputs) or (batch, outputs, 1, ...); "
                     f"got {tuple(o.shape)}")
