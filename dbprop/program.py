"""The front-end: an ``nn.Module`` traced by ``torch.fx`` and lowered to a DAG program (docs/maths.md §1, §3).

Why ``torch.fx`` symbolic tracing: it records exactly the calls ``forward`` makes (subclass ``forward``s,
module reuse, residual sums, ``torch.cat``, ``view``s), names every node by its module path, and fails
loudly on data-dependent control flow (in a submodule: that module is kept whole, one opaque node, see
:class:`_Tracer`). What it cannot see (hooks, global hooks) is refused here; weight parametrizations are read
once per call (dbprop/parametrized.py); every program checks itself once against ``model(x)`` on the first
input it runs.

Layout: the kind table and the refusals, the tracer, the lowering to the immutable IR (:mod:`dbprop.ir`),
:class:`Program` (the IR with the self-check and the per-program caches), ``compile_model`` and the cache.
The passes (:mod:`dbprop.passes`) interpret the IR and do not import this module.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import math
import operator
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import nodes as N
from . import parametrized
from .errors import UnsupportedModelError
from .ir import INPUT, IR, Step, TracedCall, as_output_matrix
from .passes import Passes
from .penalties import check_input
from .tuning import ChunkTuner

# ------------------------------------------------------------------------------------- the kind table
# Built from the node kinds' own declarations (``modules``, ``functions``, ``methods`` in dbprop/nodes.py): a
# kind's matcher lives with its operators. Module types not covered become opaque nodes.

#: module type -> node factory (name, module) -> Op
MODULE_KINDS: Dict[type, Callable[[str, nn.Module], N.Op]] = {
    t: cls.from_module for cls in N.node_kinds() for t in cls.__dict__.get("modules", ())}
#: functional form -> the module type it stands for (built from the call's keyword arguments)
FUNCTION_KINDS: Dict[Callable, type] = {f: t for cls in N.node_kinds() for f, t in cls.__dict__.get("functions", {}).items()}
#: tensor method (no arguments) -> the module type it stands for
METHOD_KINDS: Dict[str, type] = {f: t for cls in N.node_kinds() for f, t in cls.__dict__.get("methods", {}).items()}

#: (module path prefix, class name) -> node factory: kinds matched by name, their libraries not imported
#: (``module_names``, e.g. torchvision's StochasticDepth and timm's DropPath)
MODULE_NAMES: Dict[Tuple[str, str], Callable[[str, nn.Module], N.Op]] = {
    key: cls.from_module for cls in N.node_kinds() for key in cls.__dict__.get("module_names", ())}

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def module_kind(m: nn.Module) -> Optional[Callable[[str, nn.Module], N.Op]]:
    """The node factory of module ``m``'s kind (by type, then by module path and class name), or ``None``."""
    t = parametrized.unparametrized_type(m)
    make = MODULE_KINDS.get(t)
    if make is None:
        make = next((f for (prefix, name), f in MODULE_NAMES.items()
                     if t.__name__ == name and t.__module__.startswith(prefix)), None)
    return make


# ------------------------------------------------------------------------------------- refusals
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def refuse_sharded(model: nn.Module) -> None:
    """FSDP (``fully_shard`` or the FullyShardedDataParallel wrapper) shards parameters into DTensors that are
    gathered by hooks around ``forward``: neither the passes nor autograd double backprop can run on them."""
    for name, m in model.named_modules():
        cls = {c.__name__ for c in type(m).__mro__}
        sharded = "FSDPModule" in cls or "FullyShardedDataParallel" in cls
        if sharded or any(type(p).__name__ == "DTensor" for p in m.parameters(recurse=False)):
            where = f"'{name}' ({type(m).__name__})" if name else type(m).__name__
            raise UnsupportedModelError(
                f"{where} is sharded by FSDP (fully_shard / FullyShardedDataParallel, parameters are DTensors): "
                "dbprop penalties do not support FSDP. Wrap the model in DistributedDataParallel instead (supported, "
                "also with static_graph and find_unused_parameters), or compute the penalty on an unsharded copy")


def _refuse_invisible(model: nn.Module) -> None:
    """Hooks change what ``model(x)`` computes without appearing in the traced graph."""
    from torch.nn.modules import module as M
    for what in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(M, what, None):
            raise UnsupportedModelError(f"a global module hook is registered ({what.strip('_')}); dbprop cannot see "
                                        "what it does to the model's forward")
    for name, m in model.named_modules():
        where = f"'{name}' ({type(m).__name__})" if name else type(m).__name__
        for attr, what in (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
                           ("_backward_hooks", "backward hook"), ("_backward_pre_hooks", "backward pre-hook")):
            hooks = getattr(m, attr, None)
            if hooks:
                kinds = ", ".join(sorted({type(h).__name__ if not callable(h) or hasattr(h, "name")
                                          else getattr(h, "__qualname__", type(h).__name__) for h in hooks.values()}))
                legacy = " Use torch.nn.utils.parametrizations.spectral_norm / weight_norm instead (supported)." \
                    if any(k in kinds for k in ("SpectralNorm", "WeightNorm")) else ""
                raise UnsupportedModelError(
                    f"{where} has a {what} ({kinds}); hooks (e.g. the older torch.nn.utils.spectral_norm / "
                    f"weight_norm) change the forward in ways dbprop cannot see.{legacy}")


def _refuse_parametrized(model: nn.Module, graph: fx.Graph, ir: IR) -> None:
    """Parametrized tensors (docs/maths.md §4.16) are supported as the weight and bias of affine nodes, which
    read them once per call; read anywhere else (an opaque node, another kind, traced code) they are refused."""
    found = parametrized.targets(model)
    if not found:
        return
    values = {id(getattr(m, name)): f"{path}.{name}".lstrip(".") for path, m, name in found}  # parametrize.cached()
    for node in graph.nodes:  # traced code reading one: a constant tensor, or a call of its ParametrizationList
        read = values.get(id(_attr(model, node.target))) if node.op == "get_attr" else \
            node.target.replace(".parametrizations.", ".") if node.op == "call_module" and isinstance(
                _attr(model, node.target), parametrize.ParametrizationList) else None
        if read is not None:
            raise UnsupportedModelError(
                f"the parametrized tensor '{read}' is read directly in a forward; dbprop supports "
                "parametrizations of the weight and bias of Conv and Linear modules it runs as nodes")
    paths = {id(m): path for path, m, _ in found}
    for op in ir.ops:
        if not isinstance(op.module, nn.Module):
            continue
        for m in op.module.modules():
            if id(m) in paths and not (isinstance(op, N.Parametrizable) and m is op.module):
                where = f"the {op.kind} node {op.name}" + ("" if op.native else " (opaque)")
                raise UnsupportedModelError(
                    f"'{paths[id(m)]}' ({parametrized.unparametrized_type(m).__name__}) has parametrizations "
                    f"({', '.join(m.parametrizations.keys())}) and is computed by {where}; dbprop supports "
                    "parametrizations of the weight and bias of Conv and Linear modules it runs as nodes")


_NORM_FUNCTIONS = (F.layer_norm, F.group_norm, F.instance_norm, F.batch_norm)
_NORM_FAMILIES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _own_norm_forward(m: nn.Module) -> bool:
    """A norm subclass with its own ``forward`` written outside torch (timm's ``BatchNormAct2d``: ``F.batch_norm``
    with the module's buffers, then drop and activation): traced into, so that its forward counts as written.
    torch's own subclasses (``SyncBatchNorm``, ``BatchNorm3d``) are not."""
    if type(m) in MODULE_KINDS or not isinstance(m, _NORM_FAMILIES):
        return False
    defining = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    return not defining.__module__.startswith("torch.")


class _KeepWhole(Exception):
    """Raised while tracing: the module ``qualname`` cannot be traced into (``reason``); retrace it as a leaf."""

    def __init__(self, qualname: str, reason: str) -> None:
        super().__init__(f"'{qualname}': {reason}")
        self.qualname, self.reason = qualname, reason


def _owns_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _torch_forward(m: nn.Module) -> bool:
    """Whether ``m.forward`` is torch's own code (``nn.Conv2d``, or a user subclass that does not override it)."""
    defining = next((c for c in type(m).__mro__ if "forward" in c.__dict__), nn.Module)
    return defining.__module__.startswith("torch.")


#: what every nn.Module keeps in its ``__dict__`` (parameters, buffers, children, hooks): not Python state
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}


class _Tracer(fx.Tracer):
    """Which modules are traced into and which are leaves (one node each):

    * a module of a known kind is a leaf (a native node);
    * a module whose ``forward`` is written outside torch (a user's, torchvision's, timm's block) is traced into,
      also when it owns parameters or buffers directly: the parameters it reads become parameter leaves, its
      buffers and tensor attributes constants read live (docs/maths.md §4.14). User containers are traced
      through too, so their own ``forward`` counts as written, and so are norm subclasses with their own
      ``forward`` (``_own_norm_forward``);
    * a module running torch's own ``forward`` (a ``torch.nn`` module of no known kind, or a user subclass that does
      not override ``forward`` and owns parameters or buffers) is a leaf: an opaque node (exact, local autograd);
    * a module in ``keep_whole`` is a leaf (an opaque node). :func:`_trace` puts a module there when tracing
      into it fails (data-dependent control flow, any other exception), when its ``forward`` changes the module's
      Python attributes (state that a traced program would not update), and, for a module that owns parameters
      or buffers, when the lowering refuses one of its calls (such a module was always kept whole before).

    While tracing it records the modules traced into (``traced``; ``newly_traced``: those owning parameters or
    buffers, which an older rule kept whole and which :meth:`Program.verify` keeps whole if the traced program
    fails its self-check) and stamps every node with the traced-into modules it was created in
    (``node.meta["dbprop_modules"]``, innermost last)."""

    def __init__(self, keep_whole: Dict[str, str]) -> None:
        super().__init__()
        self.keep_whole = keep_whole
        self.traced: Dict[str, nn.Module] = {}
        self.newly_traced: set = set()
        self._stack: List[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_kind(m) is not None or qualname in self.keep_whole:
            return True
        if _own_norm_forward(m):
            return False
        if isinstance(m, _CONTAINERS) and type(m).forward is type(m).__mro__[
                next(i for i, c in enumerate(type(m).__mro__) if c in _CONTAINERS)].forward:
            return False
        if _torch_forward(m):
            return _owns_tensors(m) or (type(m).__module__.startswith("torch.nn") and not isinstance(m, _CONTAINERS))
        return False

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        self.traced.setdefault(qualname, m)
        if _owns_tensors(m) and not _own_norm_forward(m):
            self.newly_traced.add(qualname)
        before = dict(vars(m))

        def traced_forward(*a: Any, **k: Any) -> Any:
            self._stack.append(qualname)
            try:
                out = forward(*a, **k)
            except _KeepWhole:
                raise
            except Exception as e:  # noqa: BLE001 - any failure inside this forward: keep the module whole
                raise _KeepWhole(qualname, f"torch.fx cannot trace its forward ({type(e).__name__}: {e})") from e
            finally:
                self._stack.pop()
            now = vars(m)
            changed = sorted(k for k in now.keys() | before.keys() if k not in _MODULE_INTERNALS and
                             (k not in now or k not in before or now[k] is not before[k]))
            if changed:
                raise _KeepWhole(qualname, f"its forward changes its attributes ({', '.join(changed)}): Python state "
                                           "a traced program would not update")
            return out

        return super().call_module(m, traced_forward, args, kwargs)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["dbprop_modules"] = tuple(self._stack)
        return node


# ------------------------------------------------------------------------------------- graph -> nodes
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "__len__", "type", "is_floating_point"}


def _is_meta_method(node: fx.Node) -> bool:
    """A tensor method whose result is not a tensor (sizes, dtype names): a constant of the trace, not a node.
    ``t.type()`` names the type; ``t.type(dtype)`` is a cast, a tensor that keeps ``t``'s derivatives."""
    if node.op != "call_method" or node.target not in _META_METHODS:
        return False
    return node.target != "type" or (len(node.args) == 1 and not node.kwargs)
#: tensor attributes that are not tensors (``x.shape``): reading one is a meta call; others (``W.T``) are calls
_META_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
_ADD = {operator.add, operator.iadd, torch.add}
_CAT = {torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
# routing calls (docs/maths.md §4.12): targets (method names or functions) of Reshape and Route nodes
_ORDER_KEEPING = {"squeeze", "unsqueeze", "unflatten", "contiguous", torch.squeeze, torch.unsqueeze, torch.unflatten}
_ROUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "narrow", "select", "t", "flip",
           "roll", "diagonal", torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
           torch.moveaxis, torch.narrow, torch.select, torch.t, torch.flip, torch.roll, torch.diagonal,
           operator.getitem, N.split_item}
_ROUTE_ATTRS = {"T", "mT", "H", "mH"}
_SPLITS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}


def _fuse_split_items(graph: fx.Graph) -> None:
    """Rewrite ``chunk`` / ``split`` / ``unbind`` / ``tensor_split`` calls whose results are only indexed
    (``a, b = x.chunk(2, 1)``) into one :func:`~dbprop.nodes.split_item` call per item, so that every node has
    one tensor value; other uses of such a tuple are left as they are (an opaque node refuses them)."""
    for node in list(graph.nodes):
        how = node.target if node.op == "call_method" else getattr(node.target, "__name__", None) \
            if node.op == "call_function" and node.target in (torch.chunk, torch.split, torch.unbind,
                                                              torch.tensor_split) else None
        if how not in _SPLITS or not node.args or not isinstance(node.args[0], fx.Node) or not node.users or \
                not all(u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 and
                        isinstance(u.args[1], int) for u in node.users):
            continue
        source, kwargs, permuted = node.args[0], dict(node.kwargs), _permutation(node.args[0])
        if permuted is not None and len(source.users) == 1:  # qkv.permute(2, 0, 3, 1, 4).unbind(0): one route
            kwargs["permute"] = permuted
            permute_node, source = source, source.args[0]
        else:
            permute_node = None
        for user in list(node.users):
            with graph.inserting_before(user):
                item = graph.create_node("call_function", N.split_item,
                                         (source, user.args[1], how, *node.args[1:]), kwargs,
                                         name=f"{node.name}_{user.args[1]}")
                item.meta.update(user.meta)  # where it was traced (dbprop_modules)
            user.replace_all_uses_with(item)
            graph.erase_node(user)
        graph.erase_node(node)
        if permute_node is not None:
            graph.erase_node(permute_node)


# ------------------------------------------------------------------------------------- nn.MultiheadAttention
_MHA_PARAMETERS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]
#: what the caller may read of ``(out, weights)``: ``out`` (item 0), the weights only when nothing reads them
_SEQUENCE_FIRST = ((0, 1), (1, 0))


def mha_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], shape: Tuple[int, ...],
             source: Tuple[int, ...], heads: int, dtype: torch.dtype) -> Tensor:
    """The mask ``nn.MultiheadAttention`` hands ``F.scaled_dot_product_attention`` (``F.multi_head_attention_forward``
    written out): boolean masks (``True``: not attended) made additive (``−∞``), ``attn_mask`` of shape ``(L, S)``
    or ``(B·H, L, S)`` plus ``key_padding_mask`` ``(B, S)`` broadcast over heads and queries, as ``(B or 1, H or 1,
    L, S)``. ``shape``, ``source``: the batch-first shapes of the query and of the key."""
    def additive(m):
        if m is None or m.dtype != torch.bool:
            return m
        return torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
    B, L, S = shape[0], shape[1], source[1]
    mask, pad = additive(attn_mask), additive(key_padding_mask)
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if pad is not None:
        pad = pad.view(B, 1, 1, S).expand(-1, heads, -1, -1).reshape(B * heads, 1, S)
        mask = pad if mask is None else mask + pad
    if mask.size(0) == 1 and mask.dim() == 3:
        return mask.unsqueeze(0)
    return mask.view(B, heads, -1, S)


def _mha_arguments(node: fx.Node) -> Optional[Dict[str, Any]]:
    """The arguments of a traced ``nn.MultiheadAttention`` call by name, defaults filled in."""
    try:
        bound = inspect.signature(nn.MultiheadAttention.forward).bind(None, *node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return {k: bound.arguments[k] for k in _MHA_PARAMETERS}


def _sequence_first_source(node: Any) -> Optional[fx.Node]:
    """``h`` for a traced ``h.transpose(0, 1)`` (``transpose(1, 0)``, ``permute(1, 0, 2)``, ``swapaxes``), else ``None``."""
    if not isinstance(node, fx.Node) or not isinstance(node.args[0] if node.args else None, fx.Node) or node.kwargs:
        return None
    target = node.target if node.op in ("call_method", "call_function") else None
    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    dims = tuple(node.args[1:])
    if name == "permute" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if name in ("transpose", "swapaxes", "swapdims") and dims in _SEQUENCE_FIRST or \
            name == "permute" and dims == (1, 0, 2):
        return node.args[0]
    return None


def _expand_attention_modules(graph: fx.Graph, model: nn.Module) -> None:
    """Rewrite each call of an ``nn.MultiheadAttention`` leaf whose result is only indexed for its output
    (``out, _ = mha(x, x, x)``: the weights unread) into the traced calls it makes (docs/maths.md §4.17):
    the in-projection as ``F.linear`` of the module's own ``in_proj_weight`` (a :class:`~dbprop.nodes.Linear`,
    whose outputs q, k, v are then narrowed out; with separate ``q/k/v_proj_weight``, a Linear each plus the bias
    slice), heads split (``unflatten``, ``transpose``), ``F.scaled_dot_product_attention`` with the merged mask
    (:func:`mha_mask`, a constant of the program when the masks are), heads merged and ``F.linear`` of
    ``out_proj``'s weight and bias. Sequence-first modules (``batch_first=False``) are expanded when their inputs
    are ``h.transpose(0, 1)`` of batch-first tensors: the expansion reads ``h`` and gives its output batch first
    (a ``transpose(0, 1)`` of the output is then that output). Modules not rewritten whose weights are unread stay
    opaque nodes of their output (exact, local autograd on the math attention backend): ``add_bias_kv``,
    ``add_zero_attn``, parametrized weights (refused later), a subclass with its own ``forward``, other
    sequence-first inputs. Where the caller reads the weights the module is left as it is (an opaque node
    returning a tuple: refused)."""
    modules = dict(model.named_modules())
    targets = parametrized.targets(model)
    parametrized_modules = {id(m) for _, m, _ in targets}
    for node in list(graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, nn.MultiheadAttention):
            continue
        items = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 and
                   u.args[1] in (0, 1) and (u.args[1] == 0 or not u.users) for u in items):
            continue  # the weights are read: an opaque node returning a tuple, refused
        kw = _mha_arguments(node)
        expand = type(m).forward is nn.MultiheadAttention.forward and m.bias_k is None and m.bias_v is None and \
            not m.add_zero_attn and not any(id(sub) in parametrized_modules for sub in m.modules()) and \
            kw is not None and all(isinstance(kw[k], fx.Node) for k in ("query", "key", "value")) and \
            isinstance(kw["is_causal"], bool) and not (kw["is_causal"] and kw["attn_mask"] is None)
        qkv = [kw["query"], kw["key"], kw["value"]] if expand else []
        if expand and not m.batch_first:
            qkv = [_sequence_first_source(a) for a in qkv]
            expand = all(s is not None for s in qkv)
        if not expand:  # one opaque node, of the module's output only (Opaque nodes give one tensor)
            node.meta["dbprop_output_item"] = 0
            for u in items:
                u.replace_all_uses_with(node)
                graph.erase_node(u)
            continue
        q_in, k_in, v_in = qkv
        E, H, path = m.embed_dim, m.num_heads, node.target
        meta = dict(node.meta)

        def add(op, target, args, kwargs=None, name=None):
            new = graph.create_node(op, target, tuple(args), kwargs or {},
                                    name=None if name is None else f"{path.replace('.', '_')}_{name}")
            new.meta.update(meta)
            return new

        with graph.inserting_before(node):
            weight = lambda name: add("get_attr", f"{path}.{name}", ())  # noqa: E731
            bias = weight("in_proj_bias") if m.in_proj_bias is not None else None
            projected: Dict[fx.Node, fx.Node] = {}
            heads = []
            for i, h in enumerate((q_in, k_in, v_in)):
                if m._qkv_same_embed_dim:  # one Linear per distinct input, its outputs narrowed
                    if h not in projected:
                        projected[h] = add("call_function", F.linear, (h, weight("in_proj_weight"), bias),
                                           name="in_proj")
                    t = add("call_method", "narrow", (projected[h], -1, i * E, E))
                else:
                    t = add("call_function", F.linear, (h, weight(("q", "k", "v")[i] + "_proj_weight"), None))
                    if bias is not None:
                        t = add("call_function", operator.add, (t, add("call_method", "narrow", (bias, 0, i * E, E))))
                t = add("call_method", "unflatten", (t, -1, (H, E // H)))
                heads.append(add("call_method", "transpose", (t, 1, 2)))
            mask, causal = kw["attn_mask"], kw["is_causal"]
            if causal and kw["key_padding_mask"] is None:
                mask = None  # what the module does: is_causal, the mask a hint
            else:
                causal = False
                if mask is not None or kw["key_padding_mask"] is not None:
                    mask = add("call_function", mha_mask, (
                        mask, kw["key_padding_mask"], add("call_function", builtins.getattr, (q_in, "shape")),
                        add("call_function", builtins.getattr, (k_in, "shape")), H,
                        add("call_function", builtins.getattr, (q_in, "dtype"))))
            p = m.dropout if m.training else 0.0
            o = add("call_function", F.scaled_dot_product_attention, (*heads,),
                    {"attn_mask": mask, "dropout_p": p, "is_causal": causal}, name="attention")
            o = add("call_method", "flatten", (add("call_method", "transpose", (o, 1, 2)), 2))
            out = add("call_function", F.linear, (o, weight("out_proj.weight"),
                                                  weight("out_proj.bias") if m.out_proj.bias is not None else None),
                      name="out_proj")
            result = out if m.batch_first else add("call_method", "transpose", (out, 0, 1))
        for u in items:
            if u.args[1] == 0:
                u.replace_all_uses_with(result)
            graph.erase_node(u)
        graph.erase_node(node)
        if result is not out:  # h.transpose(0, 1) of the sequence-first output: the batch-first output itself
            for u in list(result.users):
                if _sequence_first_source(u) is result:
                    u.replace_all_uses_with(out)
                    graph.erase_node(u)
            if not result.users:
                graph.erase_node(result)
        for a in {kw["query"], kw["key"], kw["value"]}:  # the transposes read only by the module
            if not a.users and a.op != "placeholder" and a not in (q_in, k_in, v_in):
                graph.erase_node(a)


def _permutation(node: Any) -> Optional[Tuple[int, ...]]:
    """The dimensions of a traced ``x.permute(...)`` / ``torch.permute(x, dims)`` with constant dimensions."""
    if not isinstance(node, fx.Node) or not (node.op == "call_method" and node.target == "permute" or
                                             node.op == "call_function" and node.target is torch.permute):
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    dims = tuple(node.kwargs.get("dims", dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims))
    if not dims or not isinstance(node.args[0], fx.Node) or not all(isinstance(d, int) for d in dims) or \
            set(node.kwargs) - {"dims"}:
        return None
    return dims


def _specialise_defaults(model: nn.Module) -> Dict[str, Any]:
    """``forward(x, a=..., b=...)``: the parameters after the first, traced with their defaults (fx
    ``concrete_args``); a parameter without a default is refused (dbprop calls ``model(x)``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [p.name for p in params if p.default is p.empty]
    if missing:
        raise UnsupportedModelError(f"dbprop compiles models called as model(x) with one input; "
                                    f"{type(model).__name__}.forward also takes {', '.join(missing)} without a default")
    return {p.name: p.default for p in params}


def _drop_specialised(graph: fx.Graph) -> None:
    """Remove the placeholders of arguments traced with their defaults and the checks fx adds on them (their
    values are constants in the traced calls); a placeholder that feeds anything else is left (refused later)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        closure, todo = [], [ph]
        while todo:
            n = todo.pop()
            if n not in closure:
                closure.append(n)
                todo.extend(n.users)
        checks = (torch._assert, operator.eq, getattr(torch.fx._symbolic_trace, "_assert_is_none", torch._assert))
        if all(n is ph or (n.op == "call_function" and n.target in checks) for n in closure):
            for n in reversed([n for n in graph.nodes if n in closure]):
                graph.erase_node(n)
#: elementwise arithmetic lowered by ``_Lowering._arithmetic`` (docs/maths.md §4.15)
_ARITHMETIC = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
               torch.true_divide: "div", operator.sub: "sub", torch.sub: "sub", operator.neg: "neg", torch.neg: "neg",
               operator.add: "add", torch.add: "add"}
_ARITHMETIC_METHODS = {"mul": "mul", "div": "div", "true_divide": "div", "sub": "sub", "neg": "neg", "add": "add",
                       "__mul__": "mul", "__rmul__": "mul", "__truediv__": "div", "__sub__": "sub", "__neg__": "neg"}


def _has_node(a) -> bool:
    found = []
    fx.node.map_arg(a, lambda n: found.append(n))
    return bool(found)


def _normalized(node: fx.Node) -> Optional[Dict[str, Any]]:
    """The call's arguments by parameter name (``None`` when torch.fx cannot normalise them)."""
    from torch.fx.operator_schemas import normalize_function
    def kind(a):
        return torch.Tensor if isinstance(a, fx.Node) else type(a)
    try:
        r = normalize_function(node.target, node.args, node.kwargs, tuple(kind(a) for a in node.args),
                               {k: kind(v) for k, v in node.kwargs.items()}, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - unknown signature: treat as opaque
        return None
    return None if r is None else dict(r.kwargs)


def _sdpa_arguments(node: fx.Node) -> Optional[Dict[str, Any]]:
    """The arguments of a traced ``F.scaled_dot_product_attention`` call by name, defaults filled in (``None``:
    arguments it does not take)."""
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    if len(node.args) > len(N.SDPA_PARAMETERS) or set(node.kwargs) - set(N.SDPA_PARAMETERS):
        return None
    bound = dict(zip(N.SDPA_PARAMETERS, node.args))
    if set(bound) & set(node.kwargs):
        return None
    bound.update(node.kwargs)
    if any(k not in bound for k in N.SDPA_PARAMETERS[:3]):
        return None
    return {**defaults, **bound}


def _math_attention(call: TracedCall) -> Callable[[Any, Any], Any]:
    """An opaque attention call (its mask depends on ``x``) on torch's math backend: local autograd runs it
    reverse-over-reverse, and the fused kernels (flash, memory-efficient, the CPU flash kernel) have no double
    backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(tensors, values):
        with sdpa_kernel(SDPBackend.MATH):
            return call(tensors, values)
    return run


def _attr(root: nn.Module, target: str):
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Lowering:
    """The traced graph of ``model`` lowered to an :class:`~dbprop.ir.IR`: kind matching (``MODULE_KINDS``
    and the traced functions and methods), opaque nodes for everything else, refusals."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())

    def __call__(self, graph: fx.Graph) -> IR:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(f"dbprop compiles models called as model(x) with one input; this forward takes "
                                        f"{len(placeholders)} ({', '.join(p.name for p in placeholders)})")
        placeholder = placeholders[0]
        index: Dict[fx.Node, int] = {placeholder: INPUT}
        leaves: Dict[fx.Node, Tensor] = {}   # get_attr of a parameter -> the parameter
        dependent = {placeholder}            # the traced values that depend on x
        ops: List[N.Op] = []
        args: List[List[int]] = []
        steps: List[Step] = []
        output = None
        node = placeholder
        try:
            for node in graph.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    out = node.args[0]
                    if not isinstance(out, fx.Node) or out not in index:
                        raise UnsupportedModelError("the model must return one tensor (batch, ...); it returns "
                                                    f"{type(out).__name__}")
                    output = index[out]
                    if output == INPUT:
                        raise UnsupportedModelError("the model returns its input unchanged")
                    continue
                if node.op == "get_attr":
                    if isinstance(_attr(self.model, node.target), nn.Parameter):
                        leaves[node] = _attr(self.model, node.target)  # a parameter leaf once a call reads it
                    steps.append(Step(self._call(node)))
                    continue
                found: List[fx.Node] = []
                fx.node.map_arg((node.args, node.kwargs),
                                lambda a: found.append(a) if a in index or a in leaves else None)
                meta = not found or _is_meta_method(node) or (node.op == "call_function" and
                                                              node.target is builtins.getattr and
                                                              node.args[1] in _META_ATTRIBUTES)
                if meta:
                    steps.append(Step(self._call(node)))
                    continue
                folded = self._functional_linear(node, dependent, leaves) or self._functional_norm(node, dependent)
                if folded is not None:
                    op, inputs = folded[0], [folded[1]]
                else:
                    for a in dict.fromkeys(found):  # parameters read here become leaves (docs/maths.md §4.14)
                        if a not in index:
                            index[a] = len(ops)
                            steps.append(Step(self._call(a), len(ops)))
                            ops.append(N.ParameterLeaf(str(a.target), leaves[a]))
                            args.append([])
                    inputs = list(dict.fromkeys(found))  # each producer once, in order of appearance
                    if not any(a in dependent for a in inputs):
                        if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
                            raise UnsupportedModelError(f"the in-place call {self._name(node)} on a parameter cannot "
                                                        "be represented; write it out of place")
                        op = N.ParameterFunction(self._name(node), self._call(node, inputs))
                    else:
                        op = self._make_op(node, inputs)
                if any(a in dependent for a in inputs):
                    dependent.add(node)
                if isinstance(op, (N.Add, N.Cat, N.Product, N.Difference)):
                    inputs = []
                    fx.node.map_arg(node.args, inputs.append)  # every operand, in order
                elif isinstance(op, N.Attention):  # (q, k, v), the same node possibly more than once
                    inputs = [_sdpa_arguments(node)[k] for k in N.SDPA_PARAMETERS[:3]]
                index[node] = len(ops)
                steps.append(Step(self._call(node), len(ops)))
                ops.append(op)
                args.append([index[a] for a in inputs])
        except UnsupportedModelError as e:
            e.node = node  # where it was refused: compile_model may keep the module of this call whole instead
            raise
        ir = IR(type(self.model).__name__, placeholder, steps, ops, args, output)
        if not ir.depends_on_input[ir.output]:
            raise UnsupportedModelError("the model output does not depend on its input")
        return ir

    def _call(self, node: fx.Node, inputs: Tuple[fx.Node, ...] = ()) -> TracedCall:
        if node.op == "get_attr":
            return TracedCall(node, functools.partial(_attr, self.model, node.target))
        fn = self.modules[node.target] if node.op == "call_module" else \
            node.target if node.op == "call_function" else None
        return TracedCall(node, fn, tuple(inputs))

    def _opaque(self, node: fx.Node, inputs: List[fx.Node], module: Optional[nn.Module] = None) -> N.Op:
        call = self._call(node, inputs)
        if module is not None:  # a module kept whole may attend (nn.MultiheadAttention, a transformer layer)
            call = _math_attention(call)
        item = node.meta.get("dbprop_output_item")
        if item is not None:  # nn.MultiheadAttention kept whole, its (out, weights) read for out only
            call = functools.partial(lambda call, item, *a: call(*a)[item], call, item)
        return N.Opaque(self._name(node), call, module)

    @staticmethod
    def _name(node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({target})"

    def _make_op(self, node: fx.Node, inputs: List[fx.Node]) -> N.Op:
        name = self._name(node)
        if node.op == "call_module":
            m = self.modules[node.target]
            make = module_kind(m)
            if len(node.args) != 1 or node.kwargs or make is None:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    raise UnsupportedModelError(f"'{node.target}' ({type(m).__name__}) is not supported: dbprop "
                                                "handles BatchNorm1d and BatchNorm2d (and their subclasses with their "
                                                "own forward calling F.batch_norm with the module's buffers)")
                return self._opaque(node, inputs, m)
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
                return self._opaque(node, inputs, m)
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)) and \
                    m.return_indices:
                raise UnsupportedModelError(f"'{node.target}' returns indices; dbprop needs one tensor per node")
            return make(str(node.target), m)
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            return self._attention(node, inputs, name) or \
                N.Opaque(name, _math_attention(self._call(node, inputs)))
        routed = self._route(node, inputs, name)
        if routed is not None:
            return routed
        target = node.target
        arithmetic = self._arithmetic(node, inputs, name)
        if arithmetic is not None:
            return arithmetic
        if node.op == "call_method":
            if target in METHOD_KINDS and len(node.args) == 1 and not node.kwargs:
                return MODULE_KINDS[METHOD_KINDS[target]](name, METHOD_KINDS[target]())
            if target in _RESHAPE_METHODS:
                return self._reshape(node, inputs, name)
            if target in ("add", "add_") and len(inputs) == 2 and len(node.args) == 2 and not node.kwargs:
                return N.Add(name)
            if target == "mean":
                return self._mean(node, inputs, name) or self._opaque(node, inputs)
            if target.endswith("_") and not target.endswith("__"):
                raise UnsupportedModelError(f"the in-place call {name} cannot be represented; write it out of place")
            return self._opaque(node, inputs)
        if target in _ADD and len(node.args) == 2 and not node.kwargs and len(inputs) == 2 and all(
                isinstance(a, fx.Node) and a in inputs for a in node.args):
            return N.Add(name)
        if target in _CAT:
            kw = _normalized(node) or {}
            tensors, dim = kw.get("tensors", node.args[0] if node.args else None), kw.get("dim", 0)
            if isinstance(tensors, (list, tuple)) and all(isinstance(t, fx.Node) and t in inputs for t in tensors) \
                    and isinstance(dim, int):
                return N.Cat(name, dim)
            return self._opaque(node, inputs)
        if target is torch.flatten or target is torch.reshape:
            return self._reshape(node, inputs, name)
        if target is torch.mean:
            return self._mean(node, inputs, name) or self._opaque(node, inputs)
        if target is F.dropout:
            kw = _normalized(node) or {}
            if not kw.get("training", True) or kw.get("p", 0.5) == 0.0:
                return N.Identity(name)
            raise UnsupportedModelError(f"{name}: functional dropout in training mode is not supported; use nn.Dropout")
        kw = _normalized(node)
        if kw is not None and not _has_node({k: v for k, v in kw.items() if k != "input"}) and \
                kw.get("input") in inputs and len(inputs) == 1:
            kw.pop("input")
            kw.pop("inplace", None)
            if target in FUNCTION_KINDS and not kw.pop("return_indices", False):
                cls = FUNCTION_KINDS[target]
                try:
                    module = cls(**kw)
                except TypeError:
                    return self._opaque(node, inputs)
                return MODULE_KINDS[cls](name, module)
        return self._opaque(node, inputs)

    # ---- issue 17: functional norms (F.layer_norm, F.group_norm, F.instance_norm, F.batch_norm) whose weights and
    # statistics are constants or one module's own parameters and buffers (e.g. in a BatchNorm subclass's forward)
    def _functional_norm(self, node: fx.Node, dependent: set) -> Optional[Tuple[N.Op, fx.Node]]:
        """A functional norm call on a value that depends on ``x``, reading its module's parameters itself (they
        do not become parameter leaves): the node and its input."""
        make = self._match_norm_call(node)
        h = (_normalized(node) or {}).get("input") if make is not None else None
        return (make(self._name(node)), h) if h in dependent else None

    def _match_norm_call(self, node: fx.Node) -> Optional[Callable[[str], N.Op]]:
        """A factory ``name -> Op`` for a functional norm call the program represents natively, else ``None``."""
        if node.op != "call_function" or node.target not in _NORM_FUNCTIONS:
            return None
        kw = _normalized(node)
        if kw is None or not isinstance(kw.get("input"), fx.Node) or kw["input"].op == "get_attr":
            return None
        tensors: Dict[str, Optional[Tensor]] = {}
        owners = set()
        for key in ("weight", "bias", "running_mean", "running_var"):
            a = kw.get(key)
            if isinstance(a, fx.Node):
                if a.op != "get_attr":
                    return None
                owner, _, attr = a.target.rpartition(".")
                owners.add(owner)
                tensors[key] = _attr(self.model, a.target)
                if getattr(self.modules.get(owner), attr, None) is not tensors[key]:
                    return None
            elif a is None:
                tensors[key] = None
            else:
                return None
        if _has_node({k: v for k, v in kw.items() if k not in ("input", *tensors)}) or len(owners) > 1:
            return None
        owner = self.modules[owners.pop()] if owners else None
        eps = kw.get("eps", 1e-5)
        if node.target is F.batch_norm:
            return self._batch_norm_call(kw, tensors, owner)
        args = N.NormArgs(tensors["weight"], tensors["bias"], float(eps))
        if node.target is F.layer_norm:
            shape = kw["normalized_shape"]
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            return lambda name: N.SampleNorm(name, args, "layer", normalized_shape=shape)
        if node.target is F.group_norm:
            return lambda name: N.SampleNorm(name, args, "group", groups=int(kw["num_groups"]))
        # F.instance_norm: input statistics only (with running statistics it is a module's job)
        if not kw.get("use_input_stats", True) or tensors["running_mean"] is not None or \
                tensors["running_var"] is not None:
            return None
        return lambda name: N.SampleNorm(name, args, "instance")

    @staticmethod
    def _batch_norm_call(kw: Dict[str, Any], tensors: Dict[str, Optional[Tensor]],
                         m: Optional[nn.Module]) -> Optional[Callable[[str], N.Op]]:
        """``F.batch_norm`` with a BatchNorm module's own parameters and buffers (the call of ``_BatchNorm.forward``
        as subclasses write it): a :class:`~dbprop.nodes.BatchNorm` node of that module, with its running-statistics
        semantics (docs/maths.md §7.2), provided the call does what the module's mode says it does."""
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            return None
        same = all(tensors[k] is getattr(m, k) for k in ("weight", "bias")) and \
            all(tensors[k] is None or tensors[k] is getattr(m, k) for k in ("running_mean", "running_var"))
        stats_given = tensors["running_mean"] is not None and tensors["running_var"] is not None
        training = kw.get("training", False)
        batch_stats = m.training or not m.track_running_stats or m.running_mean is None
        if not same or not isinstance(training, bool) or training != batch_stats or \
                float(kw.get("eps", 1e-5)) != float(m.eps):
            return None
        if training:  # running statistics updated iff the module tracks them in train mode, as nn.BatchNorm does
            if stats_given != (m.training and m.track_running_stats) or \
                    (m.momentum is not None and stats_given and float(kw.get("momentum", 0.1)) != float(m.momentum)):
                return None
        elif not stats_given:
            return None
        return lambda name: N.BatchNorm(name, m)

    # ---- parameters, products and constants (docs/maths.md §4.14, §4.15)
    def _functional_linear(self, node: fx.Node, dependent: set,
                           leaves: Dict[fx.Node, Tensor]) -> Optional[Tuple[N.Op, fx.Node]]:
        """``F.linear(h, self.W, self.b)`` with ``h`` depending on ``x`` and ``W``, ``b`` parameters read directly:
        a :class:`~dbprop.nodes.Linear` node on ``h`` reading the live parameters (and its input node)."""
        if node.op != "call_function" or node.target is not F.linear:
            return None
        kw = _normalized(node) or {}
        h, w, b = kw.get("input"), kw.get("weight"), kw.get("bias")
        if h not in dependent or w not in leaves or not (b is None or b in leaves):
            return None
        return N.Linear(self._name(node), N.FunctionalWeights(leaves[w], None if b is None else leaves[b])), h

    def _arithmetic(self, node: fx.Node, inputs: List[fx.Node], name: str) -> Optional[N.Op]:
        """Products, differences and quotients: of two nodes (:class:`~dbprop.nodes.Product`,
        :class:`~dbprop.nodes.Difference`; a quotient of two nodes stays opaque), or of one node and a constant
        (:class:`~dbprop.nodes.ConstantAffine`), negation included. ``None``: not one of these."""
        how = _ARITHMETIC.get(node.target) if node.op == "call_function" else \
            _ARITHMETIC_METHODS.get(node.target) if node.op == "call_method" else None
        if how is None or node.kwargs:
            return None
        operands = list(node.args)
        if how == "neg":
            if len(operands) == 1 and operands[0] in inputs:
                return N.ConstantAffine(name, self._call(node, tuple(inputs)), "shift", -1.0)
            return None
        if len(operands) != 2:
            return None
        nodes = [isinstance(a, fx.Node) and a in inputs for a in operands]
        if all(nodes):
            return N.Product(name) if how == "mul" else N.Difference(name) if how == "sub" else None
        if not any(nodes) or len(inputs) != 1:
            return None
        at = nodes.index(True)
        other = operands[1 - at]
        call = self._call(node, tuple(inputs))
        if how in ("add", "sub"):
            return N.ConstantAffine(name, call, "shift", -1.0 if how == "sub" and at == 1 else 1.0)
        if how == "div" and at == 1:
            return None  # c / x depends on x beyond a constant factor: opaque (exact)

        def factor(values, other=other):
            return values[other] if isinstance(other, fx.Node) else other

        return N.ConstantAffine(name, call, how, 1.0, factor)

    def _attention(self, node: fx.Node, inputs: List[fx.Node], name: str) -> Optional[N.Op]:
        """``F.scaled_dot_product_attention(q, k, v, ...)`` with ``q``, ``k``, ``v`` traced nodes and every other
        argument a constant of the program (the mask a buffer or built from sizes): an
        :class:`~dbprop.nodes.Attention` node (docs/maths.md §4.17). A mask that depends on ``x`` or on a parameter
        stays opaque (exact); dropout is refused."""
        bound = _sdpa_arguments(node)
        p = None if bound is None else bound["dropout_p"]
        if p is not None and not isinstance(p, fx.Node) and p != 0:  # opaque or not: its mask is not in the program
            raise UnsupportedModelError(
                f"{name}: scaled_dot_product_attention with dropout_p={p} (attention dropout in training mode); "
                "dbprop needs dropout_p=0: put the model in eval mode, or set the attention dropout to 0")
        if bound is None or not all(isinstance(bound[k], fx.Node) and bound[k] in inputs
                                    for k in N.SDPA_PARAMETERS[:3]):
            return None
        rest = {k: bound[k] for k in N.SDPA_PARAMETERS[3:]}
        used: List[fx.Node] = []
        fx.node.map_arg(tuple(rest.values()), used.append)
        if any(a in inputs for a in used):
            return None

        def options(values, rest=rest):
            got = fx.node.map_arg(tuple(rest.values()), lambda n: values[n])
            return tuple(got)

        q, k, v = (bound[key] for key in N.SDPA_PARAMETERS[:3])
        return N.Attention(name, self._call(node, (q, k, v)), options)

    def _reshape(self, node, inputs, name):
        if len(inputs) != 1 or node.args[0] is not inputs[0]:
            return self._opaque(node, inputs)
        dims = None
        if node.target in ("flatten", torch.flatten):
            kw = _normalized(node) if node.op == "call_function" else None
            rest = node.args[1:]
            start = kw.get("start_dim", 0) if kw else (rest[0] if rest else node.kwargs.get("start_dim", 0))
            end = kw.get("end_dim", -1) if kw else (rest[1] if len(rest) > 1 else node.kwargs.get("end_dim", -1))
            if isinstance(start, int) and isinstance(end, int):
                dims = (start, end)
        return N.Reshape(name, self._call(node, tuple(inputs)), dims)

    def _route(self, node: fx.Node, inputs: List[fx.Node], name: str) -> Optional[N.Op]:
        """Routing calls on one traced tensor (docs/maths.md §4.4, §4.12): order-keeping reshapes (``squeeze``,
        ``unsqueeze``, ``unflatten``, ``contiguous``) as :class:`~dbprop.nodes.Reshape`, permutations and
        selections as :class:`~dbprop.nodes.Route`; ``None`` for any other call."""
        if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
            return None
        target = node.target
        if target in _ORDER_KEEPING:
            return self._reshape(node, inputs, name)
        if target in _ROUTES or (target is builtins.getattr and node.args[1] in _ROUTE_ATTRS):
            return N.Route(name, self._call(node, tuple(inputs)))
        return None

    def _mean(self, node, inputs, name):
        if len(inputs) != 1 or node.args[0] is not inputs[0]:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims) or \
                not isinstance(keepdim, bool) or set(node.kwargs) - {"dim", "keepdim"}:
            return None
        return N.Mean(name, list(dims), keepdim)


class Program:
    """A compiled model: its :class:`~dbprop.ir.IR` (``ir``; ``ops``, ``args``, ``output`` and the queries
    below read it) and what belongs to the program rather than to one call: the self-check's verdict, the
    chunk-size tuner and the native chain program. No state of a call lives here: the passes keep theirs."""

    def __init__(self, model: nn.Module, ir: IR, traced: Optional["_Traced"] = None,
                 legacy: Optional[Callable[[], "_Traced"]] = None) -> None:
        self.model = model
        self.ir = ir
        self.verified = False
        self.chunk_tuner = ChunkTuner()                        # chunk_size=None: sizes chosen by speed
        self.refusal: Optional[UnsupportedModelError] = None  # set when the self-check failed
        self._native = None
        self._traced = traced
        self._legacy = legacy  # the program as modules owning parameters were compiled before (whole), if different

    @property
    def kept_whole(self) -> Dict[str, str]:
        """The modules kept whole as one opaque node although their ``forward`` is written outside torch (qualified
        name -> why: torch.fx cannot trace it, it changes Python state, dbprop refuses a call in it)."""
        return {} if self._traced is None else dict(self._traced.keep_whole)

    def state_changed(self) -> bool:
        """Whether a Python attribute of a module traced into changed since tracing (its value is baked into the
        traced calls: ``cached_program`` then recompiles)."""
        return self._traced is not None and self._traced.state_changed()

    # ---- the IR (see dbprop.ir.IR)
    ops = property(lambda self: self.ir.ops)
    args = property(lambda self: self.ir.args)
    output = property(lambda self: self.ir.output)
    opaque_nodes = property(lambda self: self.ir.opaque_nodes)
    has_sources = property(lambda self: self.ir.has_sources)
    is_chain = property(lambda self: self.ir.is_chain)
    native_chain = property(lambda self: self.ir.native_chain)

    def parameters(self) -> List[Tensor]:
        """The tensors the gradients belong to: every parameter the nodes read, once each (shared modules:
        gradients are summed), a parametrized tensor replaced by its parametrization's parameters (§4.16)."""
        out: Dict[int, Tensor] = {}
        for p, src in zip(self.ir.params, self.ir.param_sources):
            out.update((id(t), t) for t in ([p] if src is None else parametrized.leaves(src)))
        return list(out.values())

    def read_parametrized(self, keep_state: bool, recompute: bool = False) -> Dict[Tuple[int, str], Tensor]:
        """This call's values of the parametrized tensors the nodes read, for ``parametrized.pinned``: one
        forward of each parametrization (see ``parametrized.read``)."""
        if not self.ir.parametrized:
            return {}
        return parametrized.read(list(filter(None, self.ir.param_sources)), keep_state, recompute)

    def gradients(self, node_grads: List[Optional[Tensor]], values: Dict[Tuple[int, str], Tensor]) -> Dict[int, Tensor]:
        """The passes' gradients (aligned with ``ir.params``) by ``id`` of the tensors of ``parameters()``: a
        parametrized tensor's chained to its parametrization's parameters with ``values`` (4.21)."""
        out = {id(p): g for p, src, g in zip(self.ir.params, self.ir.param_sources, node_grads)
               if src is None and g is not None}
        for i, g in parametrized.chain(self.ir.param_sources, node_grads, values).items():
            out[i] = g if i not in out else out[i] + g
        return out

    def explain(self) -> str:
        """One line per node: index, kind, where it came from, its inputs and whether it runs natively; then the
        modules kept whole and why."""
        kept = [f"  kept whole: '{name}' ({type(self.model.get_submodule(name)).__name__}): {why}"
                for name, why in self.kept_whole.items()]
        return "\n".join([self.ir.explain(), *kept])

    def __repr__(self) -> str:
        return self.explain()

    # ---- per program
    def native(self):
        """The chain as a ``dbprop._C.Program`` (descriptors plus the live weight and bias tensors; with
        parametrized weights, the call's pinned ones: one per set of weights, the last one kept)."""
        from .backends import native_module
        affine = [op for op in self.ops if isinstance(op, N.Affine)]
        if not self.ir.parametrized:
            if self._native is None:
                self._native = native_module().Program([op.descriptor() for op in self.ops],
                                                       [op.weight for op in affine], [op.bias for op in affine])
            return self._native
        tensors = [t for op in affine for t in (op.weight, op.bias)]
        last = self._native
        if last is None or len(last[0]) != len(tensors) or any(a is not b for a, b in zip(last[0], tensors)):
            last = (tensors, native_module().Program([op.descriptor() for op in self.ops], tensors[0::2],
                                                     tensors[1::2]))
            self._native = last  # holds the tensors: their ids are not reused while compared
        return last[1]

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if ``x`` cannot be fed to the program."""
        check_input(x)
        self.check_shapes(x)

    def check_shapes(self, x: Tensor) -> None:
        """The program's own part of ``check_input``: dtype, device and the shape the first layers expect
        (for callers that already ran ``dbprop.penalties.check_input``)."""
        params = self.parameters()
        if params:
            w = params[0]
            if x.dtype != w.dtype:
                raise TypeError(f"dtype mismatch: input is {x.dtype} but the model's parameters are {w.dtype}")
            if x.device != w.device:
                raise ValueError(f"device mismatch: input is on {x.device} but the model is on {w.device}")
        for n in self.ir.input_consumers:  # the layers reading x directly name the shape they expect
            op = self.ops[n]
            if isinstance(op, N.Conv):
                want, m = op.dim + 2, op.module
                if x.dim() != want or x.shape[1] != m.in_channels:
                    raise ValueError(f"{op.name} ({type(m).__name__}) expects input of shape (batch, {m.in_channels}, "
                                     f"{'L' if op.dim == 1 else 'H, W'}); got shape {tuple(x.shape)}")
            elif isinstance(op, N.Linear) and x.shape[-1] != op.module.in_features:
                raise ValueError(f"{op.name} (Linear) expects {op.module.in_features} input features in the last "
                                 f"dimension; got shape {tuple(x.shape)}")

    def verify(self, x: Tensor, buffers: Optional[Dict[str, Tensor]] = None) -> None:
        """Once per program: the traced program must reproduce ``model(x)`` (outputs equal to float tolerance).
        Runs with dropout off, the RNG forked and the model's buffers untouched (BatchNorm statistics), within
        the call's ``parametrized.pinned`` values; ``buffers``: copies of the buffers taken before those were
        read (the reference's own read of a parametrization then moves the same state the same way). If it does
        not (or fails to run) and modules owning parameters or buffers were traced into, the program is compiled
        again with those modules whole (opaque nodes, as before they were traced into) and checked again."""
        if self.verified:
            return
        if self.refusal is not None:
            raise self.refusal
        try:
            self._verify(x, buffers)
        except Exception:  # noqa: BLE001 - a refusal or a failure of the traced program: try the other one
            legacy, self._legacy = self._legacy, None
            if legacy is None:
                raise
            traced = legacy()
            self.ir, self._traced, self._native, self.refusal = traced.ir, traced, None, None
            self._verify(x, buffers)

    def _verify(self, x: Tensor, buffers: Optional[Dict[str, Tensor]]) -> None:
        dropouts = [m for m in self.model.modules() if m.training and (
            isinstance(m, nn.modules.dropout._DropoutNd) or N.DropPath.covers(m))]
        # model(x) on CLONES of the buffers: the real ones are not touched at all (not even restored: an
        # in-place restore would bump their version counters and break a graph that saved them, e.g. the
        # running statistics of an eval-mode BatchNorm in the task loss computed just before)
        buffers = {name: b.clone() for name, b in self.model.named_buffers()} if buffers is None else \
            {name: b.clone() for name, b in buffers.items()}  # a second check needs them unmoved again
        try:
            for m in dropouts:
                m.training = False
            with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                try:
                    ours = Passes(self.ir, N.PythonKernels()).forward(x, keep_inputs=False).output
                except N.UnsupportedOp as e:
                    self.refusal = UnsupportedModelError(str(e))
                    raise self.refusal from None
                ref = torch.func.functional_call(self.model, buffers, (x,), strict=False)
        finally:
            for m in dropouts:
                m.training = True
        ref = as_output_matrix(ref)
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(ref.dtype, 2e-2)
        scale = max(1.0, float(ref.abs().max()))
        err = float((ours - ref).abs().max()) if ours.shape == ref.shape else math.inf
        if not err <= tol * scale:
            self.refusal = UnsupportedModelError(
                f"the traced program of {type(self.model).__name__} does not reproduce model(x) (max difference "
                f"{err:.3g} for outputs of size {scale:.3g}): its forward depends on something torch.fx does not "
                "record (state changed in forward, in-place updates of shared tensors, Python-side randomness)")
            raise self.refusal
        self.verified = True


def compile_model(model: nn.Module) -> Program:
    """Trace ``model`` (any ``nn.Module`` called as ``model(x)``) into a DAG program.

    Modules of the supported kinds (see the README's table) run natively; any other module or traced call runs
    as an exact opaque node (local autograd). Modules whose ``forward`` is written outside torch are traced into
    (also when they own parameters: those become parameter leaves), except where that fails: such a module is kept
    whole as one opaque node (:class:`_Tracer`, ``Program.kept_whole``). Wrappers (DistributedDataParallel,
    DataParallel, torch.compile) are unwrapped. The program reads the model's live parameters and checks itself
    against ``model(x)`` on the first input it runs.

    Raises:
        UnsupportedModelError: hooks, parametrized tensors read other than as the weight or bias of a Conv or
            Linear node, models whose own ``forward`` torch.fx cannot trace (with its reason), several inputs
            (``forward`` parameters after the first are traced with their defaults; one without a default is
            refused) or outputs, in-place calls on traced tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    _refuse_invisible(model)
    traced = _compile(model, {})
    legacy = None
    if traced.newly_traced:
        keep = {**traced.keep_whole, **{name: "kept whole after the traced program failed its self-check"
                                        for name in traced.newly_traced}}
        legacy = functools.partial(_compile, model, keep)
    return Program(model, traced.ir, traced, legacy)


def _compile(model: nn.Module, keep_whole: Dict[str, str]) -> "_Traced":
    """:func:`_trace` inside ``parametrize.cached()`` (every read of a parametrized tensor gives one tensor), the
    model's buffers restored afterwards (the lowering reads parametrized weights: a spectral_norm power-iteration
    step), so that compiling leaves the model as it was."""
    buffers = [(b, b.clone()) for b in model.buffers()] if parametrized.targets(model) else []
    try:
        with parametrize.cached():
            return _trace(model, keep_whole)
    finally:
        with torch.no_grad():
            for b, before in buffers:
                if not torch.equal(b, before):
                    b.copy_(before)


class _Traced:
    """The outcome of :func:`_trace`: the IR, the modules kept whole (qualified name -> why), those traced into that
    own parameters or buffers (``newly_traced``) and the Python state of every module traced into (root included)
    that the traced calls baked in."""

    def __init__(self, ir: IR, keep_whole: Dict[str, str], tracer: _Tracer, changed: Dict[str, set],
                 root: nn.Module) -> None:
        self.ir, self.keep_whole = ir, keep_whole
        self.newly_traced = sorted(tracer.newly_traced)
        # the forward itself changes these attributes (a counter, an activation kept): the self-check judges them
        self.watched = [(m, frozenset(changed.get(name, ()))) for name, m in {"": root, **tracer.traced}.items()]
        self.state = self._state()

    def _state(self) -> tuple:
        return tuple(tuple((k, _state_value(v)) for k, v in vars(m).items() if k not in _MODULE_INTERNALS and
                           k not in skip) for m, skip in self.watched)

    def state_changed(self) -> bool:
        return self._state() != self.state


_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _state_value(v: Any) -> Any:
    """A module attribute as the state fingerprint keeps it: numbers, strings and short sequences of them by value,
    anything else by identity (a tensor attribute is read live by the program; its replacement is still seen)."""
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, (tuple, list)) and len(v) <= 64 and all(isinstance(u, _SCALARS) for u in v):
        return type(v), tuple(v)
    return "id", id(v)


def _trace(model: nn.Module, keep_whole: Dict[str, str]) -> _Traced:
    """Trace and lower ``model``, keeping whole the modules in ``keep_whole`` and each module that :class:`_Tracer`
    or the lowering blames (then retracing: at most once per module). Compiling leaves the model as it was:
    buffers the trace changed are restored, attributes the trace set to torch.fx proxies are undone."""
    concrete = _specialise_defaults(model)
    keep_whole = dict(keep_whole)
    modules = dict(model.named_modules())
    for _ in range(len(modules) + 1):
        # tracing runs Python code on real buffers (a BatchNorm subclass's num_batches_tracked.add_(1)): restore
        # any buffer the trace changed; and on the modules' attributes (self.h = x): undo proxies left there
        buffers = [(b, b.clone()) for b in model.buffers()]
        attributes = {name: dict(vars(m)) for name, m in modules.items()}
        tracer = _Tracer(keep_whole)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            _drop_specialised(graph)
            _fuse_split_items(graph)
            _expand_attention_modules(graph, model)
        except _KeepWhole as e:
            keep_whole[e.qualname] = e.reason
            continue
        except Exception as e:  # noqa: BLE001 - any tracing failure is a model dbprop cannot compile
            raise UnsupportedModelError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}") \
                from None
        finally:
            with torch.no_grad():
                for b, before in buffers:
                    if not torch.equal(b, before):
                        b.copy_(before)
            changed = _undo_proxies(modules, attributes)
        try:
            ir = _Lowering(model)(graph)
            _refuse_parametrized(model, graph, ir)
            return _Traced(ir, keep_whole, tracer, changed, model)
        except UnsupportedModelError as e:
            where = getattr(e, "node", None)
            blamed = next((name for name in reversed(where.meta.get("dbprop_modules", ()) if where else ())
                           if name in tracer.newly_traced), None)
            if blamed is None:
                raise
            keep_whole[blamed] = f"dbprop refuses a call in its forward ({e})"
    raise UnsupportedModelError(f"{type(model).__name__}: no module left to keep whole")  # not reached


def _undo_proxies(modules: Dict[str, nn.Module], before: Dict[str, Dict[str, Any]]) -> Dict[str, set]:
    """Restore (or remove) the module attributes a trace set to torch.fx proxies; return, per module, the names
    of the attributes the trace changed."""
    changed: Dict[str, set] = {}
    for name, m in modules.items():
        old, now = before[name], vars(m)
        keys = {k for k in now.keys() | old.keys() if k not in old or k not in now or now[k] is not old[k]}
        if keys:
            changed[name] = keys
        for k in keys:
            if isinstance(now.get(k), fx.Proxy):
                if k in old:
                    now[k] = old[k]
                else:
                    del now[k]
    return changed


_cache: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Program]]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """What a compiled program depends on besides parameter values: the module tree, train/eval flags, hooks,
    the parameter and buffer objects with their dtypes and devices."""
    mods = tuple((name, id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
                 for name, m in model.named_modules())
    tensors = tuple((id(t), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))
    return mods, tensors


def cached_program(model: nn.Module) -> Program:
    """``compile_model(model)``, compiled once and reused while the model's structure, modes, parameter objects,
    dtypes and devices stay the same (a changed one recompiles)."""
    model = _unwrap(model)
    sig = _signature(model)
    hit = _cache.get(model)
    if hit is None or hit[0] != sig or (isinstance(hit[1], Program) and hit[1].state_changed()):
        try:
            hit = (sig, compile_model(model))
        except UnsupportedModelError as e:  # remembered too: an unsupported model is not re-traced every call
            hit = (sig, e)
        _cache[model] = hit
    if isinstance(hit[1], UnsupportedModelError):
        raise hit[1]
    return hit[1]
