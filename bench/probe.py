"""One contender in a fresh interpreter: ``python -m bench.probe '{"network":..., "contender":..., ...}'``.

Runs the step once cold (timed: what the first call of a training script costs), then ``repeats`` warm calls
(median seconds, minor page faults per call), and prints JSON with those and the peak memory above the
baseline taken before the first call (RSS; CUDA allocator peak on a GPU, CUDA events for the times).
"""
import json
import resource
import statistics
import sys
import time

import torch

from bench.measure import peak_rss_mb, reset_peak_rss
from bench.workloads import build_case


def _timer(device):
    if device.type != "cuda":
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return timed

    def timed(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    return timed


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    fn, device = build_case(spec)
    timed = _timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base = reset_peak_rss()
    cold_s = timed(fn)
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(spec.get("repeats", 5)):
        times.append(timed(fn))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    result = {"cold_s": cold_s, "median_s": statistics.median(times), "min_s": min(times), "repeats": len(times),
              "minflt_per_call": (r1.ru_minflt - r0.ru_minflt) / max(1, len(times)),
              "rss_mb": max(0.0, peak_rss_mb() - base)}
    if device.type == "cuda":
        result["cuda_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
