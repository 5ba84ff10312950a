"""dbprop benchmarks: ``python bench/run.py`` (full, < 20 min on 2 cores) or ``--quick`` (about a minute).

For each case, every contender computes the same gradient (checked against contender (a), or against the
python backend where (a) is not run, at float32 tolerance before timing); then wall time (median / min
after warm-up, same process), FLOPs (TorchDispatchMode with torch.utils.flop_counter's formulas), peak memory
(each contender in its own subprocess) and efficiency (GFLOP/s over the plain training step's GFLOP/s).
Writes ``bench/results/<stamp>.json`` and ``.md`` (and ``latest.*``), plus ``jacobian_vs_C.png``.
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
from bench.measure import peak_memory, wall_time  # noqa: E402
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
    for out in ("logits", "softmax"):  # the target case, every contender
        rows.append(("jacobian", "wide_cifar", 128, 10, out, EXACT))
    for net in ("thesis_mnist", "mlp", "spectra"):
        for out in ("logits", "softmax"):
            rows.append(("jacobian", net, 32, 10, out, ["a_autograd_sum", "f_dbprop_native", "f_dbprop_native_chunk1"]))
        rows.append(("jacobian", net, 128, 10, "softmax", ["a_autograd_sum", "f_dbprop_native"]))
    for net in ("thesis_mnist", "wide_cifar", "mlp", "spectra"):
        rows.append(("jacobian", net, 32, 100, "softmax", ["a_autograd_sum", "f_dbprop_native_chunk1"]))
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
    base = dict(network=net, batch=B, C=C, output=output, device=str(device), threads=torch.get_num_threads())
    plain_step, _ = build_case(dict(base, contender="h_plain_step"))
    plain_t, _, _ = wall_time(plain_step, device, budget_s=args.budget)
    plain_f = count_flops(plain_step)
    plain_rate = plain_f / plain_t
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
        entry.update(median_s=med, min_s=mn, repeats=n, gflop=f / 1e9, efficiency=(f / med) / plain_rate)
        if not args.no_memory:
            entry.update({f"peak_{k}": v for k, v in peak_memory(spec).items()})
        results.append(entry)
        print(f"  {name:<28} {med * 1e3:9.1f} ms  {f / 1e9:8.2f} GFLOP  eff {entry['efficiency']:.2f}"
              + (f"  peak {entry['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in entry else ""), flush=True)
    first = results[0]
    for e in results:
        e["time_vs_first"] = e["median_s"] / first["median_s"]
        e["flops_vs_first"] = e["gflop"] / first["gflop"] if first["gflop"] else float("nan")
        if "peak_rss_mb" in e and first.get("peak_rss_mb"):
            e["memory_vs_first"] = e["peak_rss_mb"] / first["peak_rss_mb"]
    return dict(penalty=penalty, network=net, batch=B, C=C, output=output, plain_step_s=plain_t,
                plain_step_gflop=plain_f / 1e9, contenders=results)


def memory_vs_C(args, device):
    """Time and peak memory of the exact Jacobian penalty versus C (wide_cifar, B=32, softmax)."""
    points = []
    for C in (10, 50, 100):
        for name in ("a_autograd_sum", "f_dbprop_native_chunk1"):
            spec = dict(network="wide_cifar", batch=32, C=C, output="softmax", contender=name, device=str(device),
                        threads=torch.get_num_threads())
            step, _ = build_case(spec)
            med, _, _ = wall_time(step, device, budget_s=args.budget, min_repeats=2, max_repeats=5)
            mem = peak_memory(spec)
            points.append(dict(C=C, contender=name, median_s=med, peak_rss_mb=mem["rss_mb"]))
            print(f"  C={C:<4} {name:<24} {med * 1e3:9.1f} ms  peak {mem['rss_mb']:.0f} MB", flush=True)
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
             "| penalty | network | B | C | output | contender | median ms | min ms | GFLOP | efficiency | "
             "peak MB | time vs first | FLOPs vs first | memory vs first |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        for e in case["contenders"]:
            lines.append(f"| {case['penalty']} | {case['network']} | {case['batch']} | {case['C']} | {case['output']} "
                         f"| {e['contender']} | {e['median_s'] * 1e3:.1f} | {e['min_s'] * 1e3:.1f} | {e['gflop']:.2f} "
                         f"| {e['efficiency']:.2f} | {e.get('peak_rss_mb', float('nan')):.0f} "
                         f"| {e['time_vs_first']:.2f} | {e['flops_vs_first']:.2f} "
                         f"| {e.get('memory_vs_first', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small case, about a minute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per contender")
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--replot", metavar="JSON", help="only redraw jacobian_vs_C.png from a results file")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["versus_C"], os.path.join(args.out, "jacobian_vs_C.png"))
        return
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    device = torch.device(args.device)
    report = dict(machine=machine(), quick=args.quick, cases=[])
    for row in plan(args.quick):
        print(f"{row[0]} {row[1]} B={row[2]} C={row[3]} {row[4]}", flush=True)
        report["cases"].append(run_case(row, args, device))
    if not args.quick:
        print("exact Jacobian versus C", flush=True)
        report["versus_C"] = memory_vs_C(args, device)
    os.makedirs(args.out, exist_ok=True)
    stamp = "quick" if args.quick else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (stamp, "latest-quick" if args.quick else "latest"):
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(markdown(report))
    if "versus_C" in report:
        plot(report["versus_C"], os.path.join(args.out, "jacobian_vs_C.png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
