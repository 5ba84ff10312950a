"""Backend selection: the native extension ``dbprop._C`` when built, else the pure-PyTorch passes."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch

BACKENDS = ("auto", "native", "python")

_native: Optional[Any] = None
_native_error: Optional[str] = None
_warned_python = False
try:  # torch must be imported before the extension (it links against libtorch)
    from . import _C as _native  # type: ignore[attr-defined, no-redef]
except ImportError as e:  # no compiler at install time, or not built yet
    _native_error = str(e)
else:  # loading it registered the element kernels' operators (csrc/ops.cpp); their fake kernels are Python
    from .native_ops import register_fakes
    register_fakes(_native)


def check_native_tables() -> None:
    """The extension's tables (csrc: chain kinds, smooth activations, penalty heads with their reads-x column)
    must be the Python tables (dbprop/nodes.py, dbprop/penalties.py): else the extension was built from other
    sources than this package, and would misread what Python hands it."""
    if _native is None:
        return
    from . import nodes, penalties
    pairs = [("chain kinds", tuple(_native.chain_kinds()), nodes.chain_kinds()),
             ("smooth activations", tuple(_native.activation_names()), tuple(nodes.SMOOTH_ACTIVATIONS)),
             ("penalty heads (name, reads x)", dict(_native.penalty_heads()), penalties.native_heads())]
    for what, native, python in pairs:
        same = sorted(native) == sorted(python) if not isinstance(native, dict) else native == python
        if not same:
            raise ImportError(f"dbprop._C does not match this dbprop package ({what}: extension {native}, "
                              f"Python {python}); rebuild it: pip install --no-build-isolation -e .")


def native_available() -> bool:
    """Whether the compiled extension is importable and implements the passes."""
    return _native is not None and hasattr(_native, "jacobian_penalty")


def native_module():
    """The compiled extension (raises if it is not available)."""
    resolve("native")
    return _native


def backend_info() -> Dict[str, Any]:
    """What was built and what ``backend="auto"`` selects."""
    info: Dict[str, Any] = {
        "auto": "native" if native_available() else "python",
        "native_available": native_available(),
        "extension_loaded": _native is not None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if _native is not None:
        info.update(_native.build_info())
    else:
        info["extension_error"] = _native_error
    return info


def resolve(backend: str) -> str:
    """Map ``backend`` to the one that will run; ``"native"`` without the extension is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if native_available():
            return "native"
        global _warned_python
        if not _warned_python:
            _warned_python = True
            warnings.warn("dbprop: the native extension dbprop._C is not built (no compiler at install time?); "
                          "running the pure-PyTorch passes, which are exact but slower. Reinstall with "
                          "`pip install --no-build-isolation -e .` where a C++ compiler is available.",
                          RuntimeWarning, stacklevel=4)
        return "python"
    if backend == "native" and not native_available():
        raise RuntimeError("backend='native' requested but the dbprop._C extension with native passes is not "
                           "available in this installation; use backend='python' or 'auto'"
                           + (f" (import error: {_native_error})" if _native_error else ""))
    return backend

