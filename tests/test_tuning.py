"""chunk_size=None: chunk sizes chosen by timing the first calls (dbprop/tuning.py)."""
import pytest
import torch
import torch.nn as nn

import dbprop
from dbprop import functional as F
from dbprop import tuning
from dbprop.program import cached_program

from helpers import deterministic_algorithms


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100])
def test_tuning_schedule_covers_every_direction_once_with_tried_sizes(n):
    sizes = tuning.tuning_schedule(n)
    assert sum(sizes) == n
    assert set(sizes) <= set(tuning.candidates(n))
    assert tuning.candidates(n)[0] == 1


def test_tuner_picks_the_fastest_per_direction_and_the_smaller_on_a_tie():
    t = tuning.ChunkTuner()
    sizes = t.schedule("a", 10)
    assert t.tuning("a")
    for _ in range(tuning.TUNING_CALLS):  # 4 directions in a chunk cost as much as 2 (per direction: half)
        t.record("a", sizes, [{1: 1.0, 2: 1.0, 4: 2.0}[k] for k in sizes])
    assert t.schedule("a", 10) == [2] and not t.tuning("a")  # 2 and 4 tie at 0.5 s/direction: the smaller
    t.schedule("b", 10)
    for _ in range(tuning.TUNING_CALLS):
        t.record("b", sizes, [{1: 1.0, 2: 1.9, 4: 1.0}[k] for k in sizes])
    assert t.chosen()["b"] == 4


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 9)).double()


@pytest.mark.parametrize("backend", ["python", "native"])
@pytest.mark.parametrize("chain", [False, True])
def test_engine_tunes_then_keeps_its_choice_and_results_agree(backend, chain):
    if backend == "native" and not dbprop.native_available():
        pytest.skip("dbprop._C is not built")
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 9)).double() if chain else _net()
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = F.jacobian_penalty(model, x, output="softmax", chunk_size=9, backend=backend).detach()
    tuner = cached_program(model).chunk_tuner
    values = [F.jacobian_penalty(model, x, output="softmax", backend=backend).detach() for _ in range(3)]
    chosen = [k for k in tuner.chosen().values() if k is not None]
    assert chosen and all(k in tuning.candidates(9) for k in chosen)
    for v in values:
        torch.testing.assert_close(v, ref, rtol=1e-13, atol=0)


def test_deterministic_mode_times_nothing_and_repeats_bit_for_bit():
    model, x = _net(), torch.randn(4, 5, dtype=torch.float64)
    with deterministic_algorithms():
        values = [F.jacobian_penalty(model, x, output="softmax").detach() for _ in range(3)]
        assert cached_program(model).chunk_tuner.chosen() == {}  # no key was ever timed
    assert all(torch.equal(values[0], v) for v in values)
