"""The passes' host workspace: a caching CPU allocator installed while a penalty runs (csrc/workspace.h).

Without it every class chunk allocates work tensors of many megabytes that glibc maps, the kernel zero-fills
page by page and glibc unmaps again when they die: hundreds of thousands of page faults per call, and a speed
that depends on what ran earlier in the process. With it the blocks of one call are reused by the next chunk
and the next call, like CUDA's caching allocator: after the first call of a given shape, a call allocates
(next to) nothing. The price is that the blocks stay owned by the process between calls; ``empty_cache()``
returns them. Needs the native extension (without it, allocation is left to torch's default allocator).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

from .backends import native_available, native_module


@contextlib.contextmanager
def workspace() -> Iterator[None]:
    """Large host tensors allocated inside come from the workspace (any thread; nested scopes are fine)."""
    if not native_available():
        yield
        return
    C = native_module()
    C.workspace_enter()
    try:
        yield
    finally:
        C.workspace_exit()


def empty_cache() -> None:
    """Free the idle workspace blocks (tensors still alive keep theirs until they die)."""
    if native_available():
        native_module().workspace_release_cached()


def workspace_stats() -> Dict[str, int]:
    """``cached_bytes`` (idle), ``in_use_bytes``, ``hits``, ``misses``, ``depth`` (open scopes), ``enabled``."""
    if not native_available():
        return dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, depth=0, enabled=False)
    return dict(native_module().workspace_stats())


def set_workspace_enabled(enabled: bool) -> None:
    """Turn the workspace on (default) or off for later calls; off: torch's default CPU allocator throughout."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if native_available():
        native_module().workspace_set_enabled(enabled)
