"""dbprop benchmarks: ``python bench/run.py`` (full, about 30 min on 2 cores) or ``--quick`` (a few minutes).

For each case, every contender computes the same gradient (checked against contender (a), or against the
python backend where (a) is not run, at float32 tolerance before timing). Then each contender is timed twice:
in its OWN FRESH PROCESS (``python -m bench.probe``: the first call cold, then the median of warm calls, minor
page faults per warm call, peak RSS above the baseline; what a training script sees, and what the README
reports) and IN PROCESS (median / min after warm-up, all contenders sharing one process whose heap earlier
workloads warmed up). Also FLOPs (TorchDispatchMode with torch.utils.flop_counter's formulas) and efficiency
(GFLOP/s over the plain training step's, fresh process). Writes ``bench/results/<stamp>.json`` and ``.md``
(and ``latest.*``), plus ``jacobian_vs_C.png``.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dbprop  # noqa: E402
from bench.measure import fresh_process, wall_time  # noqa: E402
from bench.workloads import build_case  # noqa: E402
from dbprop.analysis.flops import count_flops  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

EXACT = ["a_autograd_sum", "b_autograd_per_class", "c_func_vmap", "c_func_vmap_chunk2", "e_dbprop_python",
         "f_dbprop_native", "f_dbprop_native_chunk1", "f_dbprop_native_chunk4"]
RANDOM = ["d_jacreg_1", "d_jacreg_C", "f_dbprop_random_1"]
OUTPUT_GRADIENT = ["a_autograd_output_gradient", "f_dbprop_output_gradient"]
DOUBLE_BACKPROP = ["g_autograd_double_backprop", "g_dbprop_double_backprop"]


def plan(quick: bool):
    """(penalty, network, batch, C, output, contenders) rows."""
    if quick:
        return [("jacobian", "thesis_mnist", 32, 10, out, ["a_autograd_sum", "e_dbprop_python", "f_dbprop_native",
                                                           "f_dbprop_native_chunk1"]) for out in ("logits", "softmax")]
    rows = []
    for out in ("logits", "softmax"):  # the target case (issue 10), every contender
        rows.append(("jacobian", "cifar_cnn", 128, 10, out, EXACT))
    for B in (32, 128):
        rows.append(("jacobian", "readme_example", B, 10, "softmax", ["a_autograd_sum", "f_dbprop_native"]))
    for out in ("logits", "softmax"):
        rows.append(("jacobian", "wide_cifar", 128, 10, out, ["a_autograd_sum", "c_func_vmap", "f_dbprop_native",
                                                               "f_dbprop_native_chunk1"]))
    for net in ("thesis_mnist", "mlp", "spectra"):
        for out in ("logits", "softmax"):
            rows.append(("jacobian", net, 32, 10, out, ["a_autograd_sum", "f_dbprop_native", "f_dbprop_native_chunk1"]))
        rows.append(("jacobian", net, 128, 10, "softmax", ["a_autograd_sum", "f_dbprop_native"]))
    for net in ("thesis_mnist", "wide_cifar", "mlp", "spectra"):
        rows.append(("jacobian", net, 32, 100, "softmax", ["a_autograd_sum", "f_dbprop_native_chunk1"]))
    rows.append(("jacobian", "mlp", 32, 1000, "softmax", ["a_autograd_sum", "f_dbprop_native",
                                                          "f_dbprop_native_chunk1"]))
    rows.append(("random", "wide_cifar", 128, 10, "softmax", RANDOM))
    rows.append(("output_gradient", "wide_cifar", 128, 10, "softmax", OUTPUT_GRADIENT))
    for net in ("wide_cifar", "thesis_mnist"):
        rows.append(("double_backprop", net, 128, 10, "softmax", DOUBLE_BACKPROP))
    return rows


def _grads(step):
    step()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in step.model.parameters()]


def _agree(g, ref, tol=5e-3):
    """Float32 agreement: ‖a − b‖ / ‖b‖ per parameter (robust to entries that cancel to near zero)."""
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, ref))
    return worst <= tol, worst


def run_case(row, args, device):
    penalty, net, B, C, output, names = row
    base = dict(network=net, batch=B, C=C, output=output, device=str(device), threads=torch.get_num_threads(),
                repeats=args.repeats)
    plain_step, _ = build_case(dict(base, contender="h_plain_step"))
    plain_f = count_flops(plain_step)
    plain_fresh = fresh_process(dict(base, contender="h_plain_step"))
    plain_rate = plain_f / plain_fresh["median_s"]
    results, reference = [], None
    for name in names:
        spec = dict(base, contender=name)
        step, _ = build_case(spec)
        entry = dict(spec, penalty=penalty)
        checked = not name.startswith(("d_", "f_dbprop_random"))  # random estimators are not comparable
        if checked:  # (this run is also the warm-up)
            g = _grads(step)
            if reference is None:
                reference = (name, g)
            else:
                ok, err = _agree(g, reference[1])
                entry["agrees_with"], entry["max_rel_diff"] = reference[0], err
                if not ok:
                    raise SystemExit(f"{name} disagrees with {reference[0]} on {row}: {err:.3g}")
        med, mn, n = wall_time(step, device, warmup=0 if checked else 1, budget_s=args.budget)
        f = count_flops(step)
        del step
        fresh = fresh_process(spec)
        entry.update(inproc_median_s=med, inproc_min_s=mn, inproc_repeats=n, gflop=f / 1e9,
                     median_s=fresh["median_s"], cold_s=fresh["cold_s"], minflt_per_call=fresh["minflt_per_call"],
                     peak_rss_mb=fresh["rss_mb"], efficiency=(f / fresh["median_s"]) / plain_rate)
        if "cuda_mb" in fresh:
            entry["peak_cuda_mb"] = fresh["cuda_mb"]
        results.append(entry)
        print(f"  {name:<28} fresh {fresh['median_s'] * 1e3:9.1f} ms (cold {fresh['cold_s'] * 1e3:.0f}, "
              f"{fresh['minflt_per_call']:.0f} faults/call)  in-process {med * 1e3:9.1f} ms  "
              f"{f / 1e9:8.2f} GFLOP  eff {entry['efficiency']:.2f}  peak {fresh['rss_mb']:.0f} MB", flush=True)
    first = results[0]
    for e in results:
        e["time_vs_first"] = e["median_s"] / first["median_s"]
        e["speedup_vs_first"] = first["median_s"] / e["median_s"]
        e["inproc_speedup_vs_first"] = first["inproc_median_s"] / e["inproc_median_s"]
        e["flops_vs_first"] = e["gflop"] / first["gflop"] if first["gflop"] else float("nan")
        if first.get("peak_rss_mb"):
            e["memory_vs_first"] = e["peak_rss_mb"] / first["peak_rss_mb"]
    return dict(penalty=penalty, network=net, batch=B, C=C, output=output, plain_step_s=plain_fresh["median_s"],
                plain_step_gflop=plain_f / 1e9, contenders=results)


def memory_vs_C(args, device):
    """Time and peak memory of the exact Jacobian penalty versus C (wide_cifar, B=32, softmax)."""
    points = []
    for C in (10, 50, 100):
        for name in ("a_autograd_sum", "f_dbprop_native_chunk1"):
            spec = dict(network="wide_cifar", batch=32, C=C, output="softmax", contender=name, device=str(device),
                        threads=torch.get_num_threads())
            r = fresh_process(dict(spec, repeats=2))
            points.append(dict(C=C, contender=name, median_s=r["median_s"], peak_rss_mb=r["rss_mb"]))
            print(f"  C={C:<4} {name:<24} {r['median_s'] * 1e3:9.1f} ms  peak {r['rss_mb']:.0f} MB", flush=True)
    return points


def plot(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({p["contender"] for p in points}):
        ps = [p for p in points if p["contender"] == name]
        axes[0].plot([p["C"] for p in ps], [p["median_s"] for p in ps], "o-", label=name)
        axes[1].plot([p["C"] for p in ps], [p["peak_rss_mb"] for p in ps], "o-", label=name)
    axes[0].set(xlabel="classes C", ylabel="time per step [s]", title="exact Jacobian penalty, WideCIFAR, B=32, CPU")
    axes[1].set(xlabel="classes C", ylabel="peak memory above baseline [MB]", title="peak memory")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine():
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                dbprop=dbprop.__version__, backend=dbprop.backend_info(), commit=commit,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def markdown(report):
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
             f"GPU: {m['gpu'] or 'none'}; commit {m['commit']}, {m['date']}.", "",
             "*fresh*: each contender in its own new process, median of the warm calls after one cold call "
             "(what a training script sees); *cold*: that first call; *in-process*: all contenders in one "
             "process after warm-up. Speed-up = first contender's median / this one's (> 1: faster).", "",
             "| penalty | network | B | C | output | contender | fresh ms | speed-up | cold ms | in-process ms | "
             "speed-up in-process | faults / call | peak MB | memory vs first | GFLOP | efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        for e in case["contenders"]:
            lines.append(f"| {case['penalty']} | {case['network']} | {case['batch']} | {case['C']} | {case['output']} "
                         f"| {e['contender']} | {e['median_s'] * 1e3:.1f} | {e['speedup_vs_first']:.2f}× "
                         f"| {e['cold_s'] * 1e3:.0f} | {e['inproc_median_s'] * 1e3:.1f} "
                         f"| {e['inproc_speedup_vs_first']:.2f}× | {e['minflt_per_call']:.0f} "
                         f"| {e['peak_rss_mb']:.0f} | {e.get('memory_vs_first', float('nan')):.2f} "
                         f"| {e['gflop']:.2f} | {e['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small case, about a minute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per contender")
    p.add_argument("--repeats", type=int, default=5, help="warm calls per fresh process (median)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--replot", metavar="JSON", help="only redraw jacobian_vs_C.png from a results file")
    p.add_argument("--only", metavar="NET", help="only the full plan's rows of this network, autograd (a) against "
                                                 "native dbprop (f); writes only-NET.{json,md}")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["versus_C"], os.path.join(args.out, "jacobian_vs_C.png"))
        return
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    device = torch.device(args.device)
    report = dict(machine=machine(), quick=args.quick, cases=[])
    rows = plan(args.quick)
    if args.only:
        rows = [(*r[:5], [c for c in r[5] if c in ("a_autograd_sum", "f_dbprop_native")]) for r in rows
                if r[1] == args.only]
        if not rows:
            p.error(f"--only: no row of the plan uses the network {args.only!r}")
    for row in rows:
        print(f"{row[0]} {row[1]} B={row[2]} C={row[3]} {row[4]}", flush=True)
        report["cases"].append(run_case(row, args, device))
    if not args.quick and not args.only:
        print("exact Jacobian versus C", flush=True)
        report["versus_C"] = memory_vs_C(args, device)
    os.makedirs(args.out, exist_ok=True)
    stamp = f"only-{args.only}" if args.only else "quick" if args.quick else \
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (stamp,) if args.only else (stamp, "latest-quick" if args.quick else "latest"):
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(markdown(report))
    if "versus_C" in report:
        plot(report["versus_C"], os.path.join(args.out, "jacobian_vs_C.png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
