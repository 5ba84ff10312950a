"""The passes' host workspace (dbprop/memory.py, csrc/workspace.h): a repeated call is served from the cache,
results are unchanged by it, the scope restores torch's allocator, and empty_cache frees the idle blocks."""
import pytest
import torch
import torch.nn as nn

import dbprop
from dbprop import functional as F
from dbprop import memory

pytestmark = pytest.mark.skipif(not dbprop.native_available(), reason="dbprop._C is not built")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 12 * 12, 7)).double()


def _call(model, x):
    model.zero_grad(set_to_none=True)
    value = F.jacobian_penalty(model, x, output="softmax", chunk_size=2)
    value.backward()
    return value.detach(), [p.grad.clone() for p in model.parameters()]


def test_second_call_allocates_nothing_new_and_results_are_unchanged():
    model, x = _model(), torch.randn(6, 3, 12, 12, dtype=torch.float64)
    memory.set_workspace_enabled(False)
    try:
        ref = _call(model, x)
    finally:
        memory.set_workspace_enabled(True)
    _call(model, x)
    before = memory.workspace_stats()
    got = _call(model, x)
    after = memory.workspace_stats()
    assert after["misses"] == before["misses"], "a repeated call of the same shape must reuse its blocks"
    assert after["hits"] > before["hits"]
    assert after["depth"] == 0
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        assert torch.equal(a, b)


def test_scope_nests_and_restores_the_default_allocator():
    with memory.workspace():
        with memory.workspace():
            assert memory.workspace_stats()["depth"] == 2
            t = torch.empty(1 << 20)  # 4 MiB: from the workspace
        assert memory.workspace_stats()["depth"] == 1
    assert memory.workspace_stats()["depth"] == 0
    in_use = memory.workspace_stats()["in_use_bytes"]
    assert in_use >= t.numel() * 4
    del t  # a block dying after its scope returns to the cache
    assert memory.workspace_stats()["in_use_bytes"] == in_use - (1 << 22)
    memory.empty_cache()
    assert memory.workspace_stats()["cached_bytes"] == 0
    big = torch.empty(1 << 20)  # outside any scope: torch's own allocator
    assert memory.workspace_stats()["in_use_bytes"] == in_use - (1 << 22)
    del big


def test_set_workspace_enabled_checks_its_argument():
    with pytest.raises(TypeError, match="bool"):
        memory.set_workspace_enabled(1)
