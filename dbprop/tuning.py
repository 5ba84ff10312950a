"""``chunk_size=None``: the number of directions (classes) per batched pass, chosen by speed.

Like ``torch.backends.cudnn.benchmark``: the first ``TUNING_CALLS`` calls for a (program, input shape, dtype,
device, penalty, gradients wanted, backend) run their directions in chunks of several candidate sizes
(1, 2, 4, ... as long as they fit the call's directions and the memory budget) and time each chunk; later
calls use the size with the least time per direction (the smaller one within ``TIE``). A tuning call costs
no more than its chunks take, and its result is exact like any other: the penalty is a sum over directions,
so chunking changes rounding only. The first call's times are discarded (new shapes: first-touch
allocation, oneDNN primitive creation). Pin a size with ``chunk_size=k`` (``chunk_size=1``: least memory).

Reproducibility: the tuning calls and the later calls sum the directions in different groupings, so their
results may differ in the last bits. Under ``torch.use_deterministic_algorithms(True)`` nothing is timed: every
call uses the largest size within the memory budget, and repeated calls agree bit for bit (as they always do
with a pinned ``chunk_size``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional

import torch

#: calls that run the candidate schedule; the times of the last one decide
TUNING_CALLS = 2
#: relative difference in time per direction under which the smaller chunk wins (less memory)
TIE = 0.03


def candidates(n: int) -> List[int]:
    """Chunk sizes tried for ``n`` directions: 1, 2, 4, ... while they fit in one call together."""
    out, total, k = [], 0, 1
    while k <= n and total + k <= n:
        out.append(k)
        total += k
        k *= 2
    return out or [max(1, n)]


def tuning_schedule(n: int) -> List[int]:
    """The chunk sizes of a tuning call, in order: the candidates, then the rest of the ``n`` directions in
    chunks of already-tried sizes (no new shapes)."""
    sizes = candidates(n)
    rest = n - sum(sizes)
    for k in reversed(sizes):
        while rest >= k:
            sizes.append(k)
            rest -= k
    return sizes


@dataclass
class _Entry:
    calls: int = 0
    best: Optional[int] = None
    seconds: Dict[int, List[float]] = field(default_factory=dict)  # size -> seconds per direction, last call


class ChunkTuner:
    """The tuned chunk sizes of one program (kept on the program, so a recompiled model retunes)."""

    def __init__(self) -> None:
        self._entries: Dict[Hashable, _Entry] = {}

    def schedule(self, key: Hashable, n: int) -> List[int]:
        """Chunk sizes for this call; the last one repeats (the engine also caps them by the budget)."""
        if torch.are_deterministic_algorithms_enabled():
            return [n]  # no timing: the budget caps it (see the module docstring)
        e = self._entries.setdefault(key, _Entry())
        if e.best is not None:
            return [e.best]
        if n <= 1:
            e.best = 1
            return [1]
        return tuning_schedule(n)

    def tuning(self, key: Hashable) -> bool:
        """Whether this call runs the candidate schedule (its chunks are to be timed)."""
        e = self._entries.get(key)
        return e is not None and e.best is None and not torch.are_deterministic_algorithms_enabled()

    def record(self, key: Hashable, sizes: List[int], seconds: List[float]) -> None:
        """The chunk sizes a tuning call ran and their wall seconds; decides after ``TUNING_CALLS`` calls."""
        e = self._entries[key]
        if e.best is not None:
            return
        e.calls += 1
        e.seconds = {}
        for k, s in zip(sizes, seconds):
            e.seconds.setdefault(k, []).append(s / k)
        if e.calls >= TUNING_CALLS:
            per_direction = {k: statistics.median(v) for k, v in e.seconds.items()}
            fastest = min(per_direction.values())
            e.best = min(k for k, v in per_direction.items() if v <= fastest * (1 + TIE))

    def chosen(self) -> Dict[Hashable, Optional[int]]:
        """Every key seen so far and its chunk size (``None`` while still tuning)."""
        return {k: e.best for k, e in self._entries.items()}


class ChunkTimer:
    """Wall seconds of each chunk of a tuning call (device synchronised), for ``ChunkTuner.record``."""

    def __init__(self, device: torch.device, on: bool) -> None:
        self.device, self.on = device, on
        self.sizes: List[int] = []
        self.seconds: List[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, k: int) -> "ChunkTimer":
        self._k = k
        return self

    def __enter__(self) -> None:
        if self.on:
            self._sync()
            self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.on and exc[0] is None:
            self._sync()
            self.sizes.append(self._k)
            self.seconds.append(time.perf_counter() - self._t0)
