"""Issue-16 targets: exact Jacobian penalty (logits, C = 10, train mode, float32), dbprop versus autograd on the
torchvision-layout ResNet-18 and ResNet-50 (32×32, B = 16; bench/tvmodels.py) and the CIFAR-layout ResNet-18
(width 64, B = 32; bench/resnet.py).

Two process states, contenders alternating in both:
* fresh: every timing in its own new process (``bench/resnet.py --worker``: one warm-up call, then the timed
  calls, median), ``--rounds`` processes per contender in the order A B A B ...; reports the median over
  processes, peak RSS (ru_maxrss) and minor faults per call;
* warm: one process holding both contenders, warmed up, then ``--repeats`` alternating timed calls (median);
  it also lists the convolution formulation chosen for every product of every layer (dbprop/formulation.py).

The parent imports no torch (see bench/resnet.py).

    PYTHONPATH=. python bench/targets.py               # writes bench/results/targets.{md,json}
    PYTHONPATH=. python bench/targets.py --nets tv_resnet18 --rounds 1 --no-write
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

NETS = {"tv_resnet18": dict(net="tv_resnet18", B=16, C=10, mode="train", width=64, target=1.3),
        "tv_resnet50": dict(net="tv_resnet50", B=16, C=10, mode="train", width=64, target=1.3),
        "cifar_resnet18": dict(net="resnet18", B=32, C=10, mode="train", width=64, target=1.4)}
#: dbprop_jacobian_aten: every convolution product through oneDNN, i.e. without this issue's formulations
CONTENDERS = ("autograd_jacobian", "dbprop_jacobian", "dbprop_jacobian_aten")


def cpu_facts():
    name, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    units = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/none"
    if units == "AVX-512" and "avx512_bf16" in flags:
        units += " (with bf16)"
    return name, units


def warm(spec, repeats):
    """Both contenders in this process, alternating; returns medians and the chosen formulations."""
    import resnet
    import torch
    torch.set_num_threads(resnet.THREADS)
    model, x, y = resnet.build(spec)
    fns = {c: resnet.CONTENDERS[c] for c in CONTENDERS}
    for fn in fns.values():  # warm-up: oneDNN primitives, the program, chunk and formulation tuning
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            fn(model, x, y, spec)
    times = {c: [] for c in fns}
    for _ in range(repeats):
        for c, fn in fns.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn(model, x, y, spec)
            times[c].append(time.perf_counter() - t0)
    from dbprop.nodes import Conv
    from dbprop.program import cached_program
    chosen = {}
    for op in cached_program(model).ops:
        if isinstance(op, Conv):
            per = {}
            for (product, _shape, rows, _dt, _dev), name in op.products.chosen().items():
                per.setdefault(product, {})[rows] = name
            w = op.weight.shape
            chosen[op.name] = dict(shape=f"{w[1]}→{w[0]} k{tuple(w[2:])} s{op.products.g.stride}", products=per)
    return dict(spec, median_s={c: statistics.median(v) for c, v in times.items()}, times_s=times,
                torch=torch.__version__, capability=torch.backends.cpu.get_cpu_capability(), chosen=chosen)


def spawn(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        for tag in ("ROW ", "WARM "):
            if line.startswith(tag):
                return json.loads(line[len(tag):])
    raise RuntimeError(f"worker failed: {args}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main(a):
    started = time.time()
    results = []
    for name in a.nets.split(","):
        spec = dict(NETS[name])
        fresh = {c: [] for c in CONTENDERS}
        for r in range(a.rounds):
            for c in (CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]):
                row = spawn([os.path.join(HERE, "resnet.py"), "--worker",
                             json.dumps(dict(spec, contender=c, repeats=a.repeats))])
                fresh[c].append(row)
                print(f"{name} fresh {c}: {row['median_s']:.3f} s, peak {row['peak_mb']:.0f} MB, "
                      f"{row['minflt_per_call']:.0f} faults/call [{time.time() - started:.0f} s]", flush=True)
        w = spawn([os.path.abspath(__file__), "--warm", json.dumps(spec), "--repeats", str(a.repeats)])
        print(f"{name} warm: " + ", ".join(f"{c} {s:.3f} s" for c, s in w["median_s"].items()), flush=True)
        results.append(dict(name=name, spec=spec, fresh=fresh, warm=w))
    return results, time.time() - started


def report(results, wall, write):
    cpu, units = cpu_facts()
    cap = results[0]["warm"]["capability"] if results else "?"
    torch_v = results[0]["warm"]["torch"] if results else "?"
    lines = ["# Issue-16 targets: exact Jacobian penalty, dbprop versus autograd", "",
             f"Machine: {cpu}, vector units {units} (torch CPU capability {cap}), 2 threads, torch {torch_v}, "
             f"float32, train mode, logits, C = 10; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
             f"UTC, {wall / 60:.1f} min.", "",
             "fresh: median over processes (each: one warm-up call, then the timed calls' median); warm: one "
             "process, contenders alternating after warm-up. Peak MB: ru_maxrss of the fresh worker.", "",
             "| network | B | autograd fresh s | dbprop fresh s | speed-up fresh | autograd warm s | dbprop warm s | "
             "speed-up warm | target | aten-only dbprop fresh / warm (speed-up) | peak MB autograd / dbprop | "
             "faults/call autograd / dbprop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f, w, spec = r["fresh"], r["warm"]["median_s"], r["spec"]
        med = {c: statistics.median(x["median_s"] for x in f[c]) for c in CONTENDERS}
        peak = {c: max(x["peak_mb"] for x in f[c]) for c in CONTENDERS}
        flt = {c: statistics.median(x["minflt_per_call"] for x in f[c]) for c in CONTENDERS}
        sf = med["autograd_jacobian"] / med["dbprop_jacobian"]
        sw = w["autograd_jacobian"] / w["dbprop_jacobian"]
        ok = "met" if min(sf, sw) >= spec["target"] else "MISSED"
        lines.append(f"| {r['name']} | {spec['B']} | {med['autograd_jacobian']:.3f} | {med['dbprop_jacobian']:.3f} | "
                     f"{sf:.2f}× | {w['autograd_jacobian']:.3f} | {w['dbprop_jacobian']:.3f} | {sw:.2f}× | "
                     f"≥ {spec['target']}× {ok} | {med['dbprop_jacobian_aten']:.3f} / {w['dbprop_jacobian_aten']:.3f} "
                     f"({med['autograd_jacobian'] / med['dbprop_jacobian_aten']:.2f}× / "
                     f"{w['autograd_jacobian'] / w['dbprop_jacobian_aten']:.2f}×) | "
                     f"{peak['autograd_jacobian']:.0f} / {peak['dbprop_jacobian']:.0f} | "
                     f"{flt['autograd_jacobian']:.0f} / {flt['dbprop_jacobian']:.0f} |")
    for r in results:
        lines += ["", f"## Formulation chosen per layer: {r['name']} (product: rows → formulation)", "",
                  "| layer | weight | K | Kᵀ | K□ |", "|---|---|---|---|---|"]
        for layer, c in r["warm"]["chosen"].items():
            cells = [", ".join(f"{rows}: {n}" for rows, n in sorted(c["products"].get(p, {}).items(),
                                                                       key=lambda kv: int(kv[0]))) or "aten only"
                     for p in ("K", "Kt", "Kbox")]
            lines.append(f"| {layer} | {c['shape']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if write:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "targets.md"), "w") as fh:
            fh.write(md)
        with open(os.path.join(HERE, "results", "targets.json"), "w") as fh:
            json.dump(dict(cpu=cpu, units=units, wall_s=wall, results=results), fh, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per contender")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if a.warm:
        print("WARM " + json.dumps(warm(json.loads(a.warm), a.repeats)), flush=True)
    else:
        report(*main(a), write=not a.no_write)
