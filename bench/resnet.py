"""ResNet-18 (CIFAR layout, 32×32) and DCGAN critic (64×64, BatchNorm): dbprop versus autograd.

Each contender is timed in its own fresh process (``python bench/resnet.py --worker '<json spec>'``): one
warm-up call, then ``repeats`` timed calls (median reported; repeats drops to 1 when the warm-up call takes
more than 8 s), plus minor page faults per timed call and ru_maxrss peak memory of the worker. Gradient
agreement of dbprop versus the autograd contender is checked once per row, also in a fresh process.

The parent imports no torch: a child's ru_maxrss inherits the parent's RSS high-water mark at exec, so the
parent must stay small for the children's peak memory to mean anything.

    PYTHONPATH=. python bench/resnet.py                 # default plan, writes bench/results/resnet18.{md,json}
    PYTHONPATH=. python bench/resnet.py --smoke         # tiny sizes (width 8, B=2), no files written
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DBP_WEIGHT = 0.1
THREADS = 2


# ----------------------------------------------------------------------------------------------- models
def _models():
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.relu2 = nn.ReLU()
            self.shortcut = None
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            identity = x if self.shortcut is None else self.shortcut(x)
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu2(out)

    class ResNet18(nn.Module):
        def __init__(self, num_classes=10, width=64):
            super().__init__()
            w = width
            self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.relu = nn.ReLU()
            layers, c_in = [], w
            for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
                stride = 1 if i == 0 else 2
                layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
                c_in = c_out
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(8 * w, num_classes)

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return self.fc(self.flatten(self.pool(out)))

    class DCGANCritic(nn.Module):
        def __init__(self, width=64):
            super().__init__()
            w = width
            self.main = nn.Sequential(
                nn.Conv2d(3, w, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
                nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
                nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2),
                nn.Conv2d(4 * w, 8 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(8 * w), nn.LeakyReLU(0.2),
                nn.Conv2d(8 * w, 1, 4, 1, 0, bias=False))

        def forward(self, x):
            return self.main(x)  # (B, 1, 1, 1)

    return ResNet18, DCGANCritic


def build(spec):
    """Model, input, labels for a spec (seeded, float32, train/eval as the spec says)."""
    import torch
    ResNet18, DCGANCritic = _models()
    torch.manual_seed(spec.get("seed", 0))
    if spec["net"] == "resnet18":
        model = ResNet18(spec["C"], spec["width"])
        shape = (3, 32, 32)
    elif spec["net"] in ("tv_resnet18", "tv_resnet50"):  # torchvision's layout (bench/tvmodels.py)
        import tvmodels
        model = getattr(tvmodels, spec["net"][3:])(spec["C"])
        shape = (3, 32, 32)
    else:
        model = DCGANCritic(spec["width"])
        shape = (3, 64, 64)
    model.train(spec["mode"] == "train")
    x = torch.randn(spec["B"], *shape)
    y = torch.randint(0, max(spec.get("C", 1), 1), (spec["B"],))
    return model, x, y


# ----------------------------------------------------------------------------------------------- contenders
def plain(model, x, y, spec):
    import torch.nn.functional as F
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def autograd_jacobian(model, x, y, spec):
    import torch
    x = x.detach().requires_grad_(True)
    out = model(x)
    total = 0.0
    for i in range(out.shape[1]):
        g = torch.autograd.grad(out[:, i].sum(), x, create_graph=True)[0]
        total = total + g.pow(2).sum()
    total = total / x.shape[0]
    total.backward()
    return total.detach()


def dbprop_jacobian(model, x, y, spec, chunk_size=None):
    import dbprop
    p = dbprop.functional.jacobian_penalty(model, x, chunk_size=chunk_size)
    p.backward()
    return p.detach()


def dbprop_jacobian_aten(model, x, y, spec):
    """dbprop with every convolution product through oneDNN (formulation timing off): the state before issue 16."""
    from dbprop import formulation
    formulation.set_tuning(False)
    try:
        return dbprop_jacobian(model, x, y, spec)
    finally:
        formulation.set_tuning(True)


def dbprop_jacobian_chunk1(model, x, y, spec):
    return dbprop_jacobian(model, x, y, spec, chunk_size=1)


def autograd_double_backprop(model, x, y, spec):
    """mean_b [ℓ_b + λ‖∇x ℓ_b‖²]; ∇x of the summed loss is the per-sample gradient (train-mode BN: of the batch
    sum, the same semantics as dbprop, docs/maths.md §7)."""
    import torch
    import torch.nn.functional as F
    x = x.detach().requires_grad_(True)
    out = model(x)
    l_sum = F.cross_entropy(out, y, reduction="sum")
    g = torch.autograd.grad(l_sum, x, create_graph=True)[0]
    B = x.shape[0]
    loss = l_sum / B + DBP_WEIGHT * g.pow(2).sum() / B
    loss.backward()
    return loss.detach()


def dbprop_double_backprop(model, x, y, spec):
    import dbprop
    loss = dbprop.functional.double_backprop_loss(model, x, y, DBP_WEIGHT)
    loss.backward()
    return loss.detach()


def autograd_wgan_gp(model, x, y, spec):
    import torch
    x = x.detach().requires_grad_(True)
    out = model(x)
    g = torch.autograd.grad(out.sum(), x, create_graph=True)[0]
    gp = (g.flatten(1).norm(dim=1) - 1.0).pow(2).mean()
    gp.backward()
    return gp.detach()


def dbprop_wgan_gp(model, x, y, spec):
    import dbprop
    gp = dbprop.functional.gradient_penalty(model, x)
    gp.backward()
    return gp.detach()


CONTENDERS = {f.__name__: f for f in (plain, autograd_jacobian, dbprop_jacobian, dbprop_jacobian_aten, dbprop_jacobian_chunk1,
                                      autograd_double_backprop, dbprop_double_backprop, autograd_wgan_gp,
                                      dbprop_wgan_gp)}
PAIRS = {"dbprop_jacobian": "autograd_jacobian", "dbprop_jacobian_chunk1": "autograd_jacobian",
         "dbprop_double_backprop": "autograd_double_backprop", "dbprop_wgan_gp": "autograd_wgan_gp"}


# ----------------------------------------------------------------------------------------------- workers
def _setup():
    import torch
    torch.set_num_threads(THREADS)
    return torch


def worker(spec):
    import resource
    torch = _setup()
    model, x, y = build(spec)
    fn = CONTENDERS[spec["contender"]]
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    warm_s = None
    repeats = spec.get("repeats", 3)
    if spec.get("warmup", True):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn(model, x, y, spec)
        warm_s = time.perf_counter() - t0
        if warm_s > spec.get("slow_s", 8.0):
            repeats = 1
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        value = fn(model, x, y, spec)
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    row = dict(spec, median_s=statistics.median(times), times_s=times, warmup_s=warm_s, repeats=repeats,
               minflt_per_call=(r1.ru_minflt - r0.ru_minflt) / repeats,
               peak_mb=r1.ru_maxrss / 1024.0, base_mb=base_mb, value=float(value),
               torch=torch.__version__, threads=torch.get_num_threads())
    print("ROW " + json.dumps(row), flush=True)


def check(spec):
    """Loss value and relative L2 error per parameter gradient: dbprop contender versus its autograd twin."""
    torch = _setup()
    model, x, y = build(spec)
    res = {}
    for name in (PAIRS[spec["contender"]], spec["contender"]):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        value = CONTENDERS[name](model, x, y, spec)
        dt = time.perf_counter() - t0
        res[name] = (float(value), {k: p.grad.detach().clone() for k, p in model.named_parameters()
                                    if p.grad is not None}, dt)
    (va, ga, ta), (vd, gd, td) = res[PAIRS[spec["contender"]]], res[spec["contender"]]
    # a parameter the penalty does not depend on (the head bias of a Jacobian) may get None on one side and
    # zeros on the other: None counts as zero; an all-zero reference compares by absolute norm
    worst, worst_name, missing = 0.0, None, sorted(set(ga) ^ set(gd))
    for k in sorted(set(ga) | set(gd)):
        a = ga.get(k, torch.zeros_like(gd.get(k, ga.get(k))))
        d = gd.get(k, torch.zeros_like(a))
        na = a.norm().item()
        err = (d - a).norm().item() / na if na > 0 else d.norm().item()
        if err > worst:
            worst, worst_name = err, k
    out = dict(spec, autograd=PAIRS[spec["contender"]], value_autograd=va, value_dbprop=vd,
               value_rel_err=abs(vd - va) / max(abs(va), 1e-30), worst_grad_rel_err=worst, worst_param=worst_name,
               none_grads_one_side=missing, autograd_s=ta, dbprop_s=td, ok=worst < 1e-3)
    print("CHECK " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------- parent
def spawn(kind, spec, timeout=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--" + kind, json.dumps(spec)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  TIMEOUT {kind} {spec}", flush=True)
        return None
    tag = "ROW " if kind == "worker" else "CHECK "
    for line in p.stdout.splitlines():
        if line.startswith(tag):
            r = json.loads(line[len(tag):])
            r["process_wall_s"] = time.time() - t0
            return r
    print(f"  FAILED {kind} {spec}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}", flush=True)
    return None


def plan(smoke):
    if smoke:
        rn = dict(net="resnet18", width=8, B=2, C=10)
        cr = dict(net="critic", width=8, B=2, C=1)
    else:
        rn = dict(net="resnet18", width=64, B=32, C=10)
        cr = dict(net="critic", width=64, B=64, C=1)
    main5 = ["plain", "autograd_jacobian", "dbprop_jacobian", "autograd_double_backprop", "dbprop_double_backprop"]
    rows = [("1", dict(rn, mode="train"), main5, ["dbprop_jacobian", "dbprop_double_backprop"]),
            ("2", dict(rn, mode="eval"), main5, ["dbprop_jacobian", "dbprop_double_backprop"]),
            ("4", dict(cr, mode="train"), ["autograd_wgan_gp", "dbprop_wgan_gp"], ["dbprop_wgan_gp"]),
            ("3", dict(rn, mode="train"), ["dbprop_jacobian_chunk1"], ["dbprop_jacobian_chunk1"])]
    return rows


def main(args):
    started = time.time()
    rows, checks = [], []
    for row_id, base, contenders, to_check in plan(args.smoke):
        if args.rows and row_id not in args.rows.split(","):
            continue
        for c in to_check:
            r = spawn("check", dict(base, contender=c))
            if r:
                checks.append(dict(r, row=row_id))
                print(f"check row {row_id} {base['mode']} {c} vs {r['autograd']}: worst grad rel err "
                      f"{r['worst_grad_rel_err']:.2e} ({r['worst_param']}), value {r['value_dbprop']:.6g} vs "
                      f"{r['value_autograd']:.6g}, ok={r['ok']}", flush=True)
        for c in contenders:
            spec = dict(base, contender=c, repeats=args.repeats)
            r = spawn("worker", spec)
            if r:
                rows.append(dict(r, row=row_id))
                print(f"row {row_id} {base['mode']} C={base['C']} {c}: {r['median_s']:.3f} s (x{r['repeats']}), "
                      f"peak {r['peak_mb']:.0f} MB, {r['minflt_per_call']:.0f} faults/call "
                      f"[{time.time() - started:.0f} s elapsed]", flush=True)
        if row_id == "3":  # C = 100 at chunk 1, sized from the C = 10 call
            c10 = [r for r in rows if r["row"] == "3" and r["C"] == base["C"]]
            est = 10 * c10[0]["median_s"] if c10 else float("inf")
            if est > args.c100_skip_s:
                print(f"row 3 C=100 skipped: estimated {est:.0f} s > {args.c100_skip_s:.0f} s", flush=True)
                rows.append(dict(base, C=10 * base["C"], contender="dbprop_jacobian_chunk1", row="3",
                                 skipped=f"estimated {est:.0f} s per call"))
            else:
                spec = dict(base, C=10 * base["C"], contender="dbprop_jacobian_chunk1", repeats=1,
                            warmup=est <= 60.0)
                r = spawn("worker", spec)
                if r:
                    rows.append(dict(r, row="3"))
                    print(f"row 3 train C={spec['C']} chunk1: {r['median_s']:.3f} s, peak {r['peak_mb']:.0f} MB, "
                          f"warm-up {spec['warmup']}", flush=True)
    return rows, checks, time.time() - started


# ----------------------------------------------------------------------------------------------- report
def _cpu():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _find(rows, row, contender, C=None):
    for r in rows:
        if r["row"] == row and r["contender"] == contender and (C is None or r["C"] == C) and "median_s" in r:
            return r
    return None


def report(rows, checks, wall, smoke):
    autograd_of = {"dbprop_jacobian": "autograd_jacobian", "dbprop_double_backprop": "autograd_double_backprop",
                   "dbprop_wgan_gp": "autograd_wgan_gp", "dbprop_jacobian_chunk1": "autograd_jacobian"}
    torch_v = next((r["torch"] for r in rows if "torch" in r), "?")
    lines = ["# ResNet-18 (CIFAR, 32×32) and DCGAN critic (64×64): dbprop versus autograd", "",
             f"Machine: {_cpu()}, {THREADS} threads (torch.set_num_threads), torch {torch_v}, float32, CPU; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Total wall time {wall / 60:.1f} min.", "",
             "Each contender ran in its own fresh process (`python bench/resnet.py --worker <spec>`): one warm-up "
             "call (unless noted), then the timed calls (median; 3 repeats, 1 when a call takes > 8 s). Peak MB = "
             "ru_maxrss of that worker (includes the ~import/model baseline, column *base MB*); minor faults = "
             "ru_minflt over the timed calls / repeats. ResNet-18: width 64, B = 32; critic: B = 64. "
             "Ratio to plain = median / plain cross-entropy step of the same row's mode (row 4: no plain step).", "",
             "| row | mode | C | contender | median s | repeats | ratio to plain step | speed-up vs autograd | "
             "peak MB | base MB | minor faults / call |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['row']} | {r['mode']} | {r['C']} | {r['contender']} | skipped ({r['skipped']}) "
                         f"| | | | | | |")
            continue
        plain_row = _find(rows, "2" if r["mode"] == "eval" else "1", "plain")
        ratio = f"{r['median_s'] / plain_row['median_s']:.2f}×" if plain_row and r["net"] == "resnet18" else "–"
        ag = _find(rows, "1" if r["row"] == "3" else r["row"], autograd_of.get(r["contender"], ""), r["C"])
        sp = f"{ag['median_s'] / r['median_s']:.2f}×" if ag else "–"
        warm = "" if r.get("warmup", True) else " (no warm-up)"
        lines.append(f"| {r['row']} | {r['mode']} | {r['C']} | {r['contender']}{warm} | {r['median_s']:.3f} | "
                     f"{r['repeats']} | {ratio} | {sp} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
                     f"{r['minflt_per_call']:.0f} |")
    lines += ["", "## Gradient checks (fresh process, actual model, once per row)", "",
              "| row | mode | C | dbprop | autograd | value dbprop | value autograd | worst param rel L2 err | "
              "param | ok (< 1e-3) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['row']} | {c['mode']} | {c['C']} | {c['contender']} | {c['autograd']} | "
                     f"{c['value_dbprop']:.6g} | {c['value_autograd']:.6g} | {c['worst_grad_rel_err']:.2e} | "
                     f"{c['worst_param']} | {'yes' if c['ok'] else 'NO'} |")
    lines += ["", "## Targets", ""] + targets(rows)
    md = "\n".join(lines) + "\n"
    if not smoke:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "resnet18.md"), "w") as f:
            f.write(md)
        with open(os.path.join(RESULTS, "resnet18.json"), "w") as f:
            json.dump(dict(cpu=_cpu(), threads=THREADS, torch=torch_v, wall_s=wall,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(), rows=rows,
                           checks=checks), f, indent=1)
    print(md)


def targets(rows):
    out = []

    def t(name, ok, text):
        out.append(f"- {name}: **{'met' if ok else 'missed'}** — {text}")

    for row, mode in (("1", "train"), ("2", "eval")):
        p, a, d = _find(rows, row, "plain"), _find(rows, row, "autograd_jacobian"), _find(rows, row, "dbprop_jacobian")
        if p and a and d:
            r1, r2 = d["median_s"] / p["median_s"], a["median_s"] / d["median_s"]
            t(f"Jacobian C=10 ({mode}) ≤ 12× a plain step", r1 <= 12, f"{r1:.2f}× ({d['median_s']:.2f} s vs "
              f"{p['median_s']:.3f} s)")
            t(f"Jacobian C=10 ({mode}) ≥ 1.4× faster than autograd", r2 >= 1.4,
              f"{r2:.2f}× ({a['median_s']:.2f} s vs {d['median_s']:.2f} s)")
        a2, d2 = _find(rows, row, "autograd_double_backprop"), _find(rows, row, "dbprop_double_backprop")
        if p and d2:
            r = d2["median_s"] / p["median_s"]
            extra = f"; autograd {a2['median_s'] / p['median_s']:.2f}×" if a2 else ""
            t(f"DoubleBackpropLoss ({mode}) ≤ 2.4× a plain step", r <= 2.4, f"{r:.2f}× ({d2['median_s']:.3f} s vs "
              f"{p['median_s']:.3f} s{extra})")
    a, c10 = _find(rows, "1", "autograd_jacobian"), _find(rows, "3", "dbprop_jacobian_chunk1", 10)
    c100 = next((r for r in rows if r["row"] == "3" and r["C"] == 100), None)
    if a and c10:
        # peak memory of the step above the process baseline (import + model) and raw ru_maxrss
        ra = (c10["peak_mb"] - c10["base_mb"]) / max(a["peak_mb"] - a["base_mb"], 1e-9)
        rr = c10["peak_mb"] / a["peak_mb"]
        t("chunk-1 peak memory at C=10 ≤ 0.15× autograd's", ra <= 0.15,
          f"above baseline {ra:.3f}× ({c10['peak_mb'] - c10['base_mb']:.0f} MB vs {a['peak_mb'] - a['base_mb']:.0f} "
          f"MB); raw ru_maxrss {rr:.3f}× ({c10['peak_mb']:.0f} MB vs {a['peak_mb']:.0f} MB)")
    if c10 and c100:
        if "skipped" in c100:
            out.append(f"- chunk-1 peak memory flat C=10 → 100: **not measured** — C=100 skipped ({c100['skipped']})")
        else:
            g = c100["peak_mb"] / c10["peak_mb"]
            t("chunk-1 peak memory flat from C=10 to 100", g <= 1.10,
              f"{c10['peak_mb']:.0f} MB → {c100['peak_mb']:.0f} MB ({g:.2f}×; flat taken as ≤ 1.10×); time "
              f"{c10['median_s']:.1f} s → {c100['median_s']:.1f} s")
    a, d = _find(rows, "4", "autograd_wgan_gp"), _find(rows, "4", "dbprop_wgan_gp")
    if a and d:
        r = a["median_s"] / d["median_s"]
        t("WGAN-GP ≥ 1.5× faster than autograd", r >= 1.5, f"{r:.2f}× ({a['median_s']:.3f} s vs {d['median_s']:.3f} s)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="JSON")
    ap.add_argument("--check", metavar="JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (width 8, B = 2); writes no files")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="", help="comma-separated subset of rows 1,2,3,4 (default all)")
    ap.add_argument("--c100-skip-s", type=float, default=180.0, help="skip chunk-1 C=100 above this estimate")
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
    elif a.check:
        check(json.loads(a.check))
    else:
        report(*main(a), smoke=a.smoke)
