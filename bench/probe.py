"""Memory probe: ``python -m bench.probe '{"network":..., "contender":..., ...}'`` runs one contender once and
prints its peak memory above the baseline (RSS, and CUDA allocator peak on a GPU) as JSON."""
import json
import sys

import torch

from bench.measure import peak_rss_mb, reset_peak_rss
from bench.workloads import build_case


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    fn, device = build_case(spec)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base = reset_peak_rss()
    fn()
    result = {"rss_mb": max(0.0, peak_rss_mb() - base)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["cuda_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
