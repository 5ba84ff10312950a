"""The two autocast policies for a penalty, measured: ``python bench/autocast.py [--repeats N]``.

Exact Jacobian penalty (logits and softmax) of the CIFAR-like CNN, B = 128, C = 10, on this machine's CPU:

* autograd double backprop in float32, and under ``torch.autocast(dtype=torch.bfloat16)``;
* dbprop under bf16 autocast with the shipped policy (the passes in the parameters' precision, float32);
* dbprop with the alternative policy (the passes computed in bfloat16 on a bf16 copy of the model refreshed
  from the float32 parameters each step; the kernels accumulate in float32; gradients cast back).

Time: each contender in its own fresh process (bench/probe.py: cold call, warm median). Error: relative
gradient error ``‖g − g₆₄‖ / ‖g₆₄‖`` over all parameters against the float64 gradient, mean over three inputs.
Writes bench/results/autocast.{md,json}.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.measure import fresh_process  # noqa: E402
from bench.networks import make  # noqa: E402
from bench.workloads import CONTENDERS  # noqa: E402

ROWS = [("a_autograd_sum", "autograd, float32"),
        ("a_autograd_sum_autocast_bf16", "autograd under bf16 autocast"),
        ("f_dbprop_native_autocast_bf16", "dbprop under bf16 autocast (shipped: float32 passes)"),
        ("f_dbprop_native_bf16_compute", "dbprop, passes in bf16 (alternative policy)")]
NETWORK, B, C = "cifar_cnn", 128, 10


def gradient_error(contender: str, output: str, seeds=(1, 2, 3)) -> float:
    model, shape = make(NETWORK, C)
    ref = make(NETWORK, C)[0].double()
    errs = []
    for seed in seeds:
        x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(seed))
        for m in (model, ref):
            for p in m.parameters():
                p.grad = None
        CONTENDERS[contender](model, x, None, output, C)
        CONTENDERS["f_dbprop_native"](ref, x.double(), None, output, C)
        g, g64 = (torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).double().flatten()
                             for p in m.parameters()]) for m in (model, ref))
        errs.append(((g - g64).norm() / g64.norm()).item())
    return sum(errs) / len(errs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    results = []
    for output in ("logits", "softmax"):
        for contender, label in ROWS:
            spec = dict(network=NETWORK, C=C, batch=B, output=output, contender=contender, repeats=args.repeats)
            r = fresh_process(spec)
            r.update(output=output, contender=contender, label=label, rel_grad_error=gradient_error(contender, output))
            results.append(r)
            print(f"{output:8s} {label:55s} cold {r['cold_s']:.3f} s  warm {r['median_s']:.3f} s  "
                  f"error {r['rel_grad_error']:.1e}", flush=True)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(here, "autocast.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# Autocast policies: exact Jacobian, {NETWORK}, B={B}, C={C}, CPU, {torch.get_num_threads()} threads",
             "", "Each contender in its own fresh process (warm median of the repeats after one cold call); "
             "error: relative gradient error against float64, mean of 3 inputs.", "",
             "| output | contender | cold (s) | warm median (s) | vs autograd fp32 | rel. gradient error |",
             "|---|---|---|---|---|---|"]
    for output in ("logits", "softmax"):
        rows = [r for r in results if r["output"] == output]
        base = rows[0]["median_s"]
        for r in rows:
            lines.append(f"| {output} | {r['label']} | {r['cold_s']:.3f} | {r['median_s']:.3f} | "
                         f"{base / r['median_s']:.2f}× | {r['rel_grad_error']:.1e} |")
    with open(os.path.join(here, "autocast.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
