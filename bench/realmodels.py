"""Real torchvision / timm architectures (random weights): native-node fraction, fallback, largest error of the
exact Jacobian penalty against autograd double backprop (float64, relative to the global gradient scale), and
optionally the speed of dbprop against autograd (float32, train mode, B=16, 32×32, C=10).

Where autograd cannot double-backprop at all (``NO_AUTOGRAD``: MobileNetV3, whose Hardsigmoid has no double
backward in ATen) the speed row compares dbprop's exact Jacobian penalty step and DoubleBackpropLoss step with a
PLAIN training step of the same model (cross-entropy forward and backward, no penalty) instead.
Each contender: one warm-up call (tracing, self-check, formulation and chunk timing), then the median of
``--repeats`` calls, and its peak RSS above the RSS before the warm-up (meaningful with ``--fresh``: one process
per contender); the contenders alternate (the order reversed in the second round) and the medians of the rounds
are reported.

Needs torchvision and timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``)::

    python bench/realmodels.py                 # coverage and exactness table
    python bench/realmodels.py --speed         # + speed, both contenders alternating in one process
    python bench/realmodels.py --models tv_convnext_tiny --speed --fresh   # one contender per fresh process
    python bench/realmodels.py --models tv_mobilenet_v3_small tv_mobilenet_v3_large --speed --fresh --repeats 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", d) for d in (".", "tests")]

import dbprop  # noqa: E402
from dbprop import fallback  # noqa: E402
from dbprop import penalties as P  # noqa: E402
from dbprop import functional as Fn  # noqa: E402

from bench.measure import cpu_name, peak_rss_mb, reset_peak_rss  # noqa: E402
from test_real_models import MODELS, _no_dropout, largest_error, native_fraction  # noqa: E402

#: models where autograd has no double backward (hardsigmoid_backward): their speed rows time dbprop against a
#: plain training step
NO_AUTOGRAD = ("tv_mobilenet_v3_small", "tv_mobilenet_v3_large")
#: the contenders of a speed row: against autograd, or (NO_AUTOGRAD) against a plain training step
CONTENDERS = ("autograd", "dbprop", "autograd_double_backprop", "dbprop_double_backprop")
PLAIN_CONTENDERS = ("plain", "dbprop", "dbprop_double_backprop")
#: DoubleBackpropLoss's weight in its speed row (any value: the work does not depend on it)
DOUBLE_BACKPROP_WEIGHT = 0.1


def coverage_row(name: str) -> dict:
    make, side, _ = MODELS[name]
    row = {"model": name}
    torch.manual_seed(0)
    model = _no_dropout(make()).double().train()
    try:
        program = dbprop.compile_model(model)
        row["nodes"] = len(program.ops)
        row["native"] = round(native_fraction(program), 4)
        row["opaque"] = sorted({type(op.module).__name__ if op.module is not None else op.name.split(" (")[-1][:-1]
                                for op in program.ops if not op.native})[:8]
    except Exception as e:  # noqa: BLE001 - reported, not raised
        row["error"] = f"{type(e).__name__}: {e}"[:200]
        return row
    for train in (True, False):
        model.train(train)
        x = torch.randn(2, 3, side, side, dtype=torch.float64)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", dbprop.core.FallbackWarning)
                row["err_train" if train else "err_eval"] = f"{largest_error(model, x)[0]:.1e}"
        except Exception as e:  # noqa: BLE001
            row["err_train" if train else "err_eval"] = f"{type(e).__name__}: {e}"[:160]
    return row


def time_contender(name: str, contender: str, repeats: int, B: int = 16, C: int = 10) -> dict:
    """Seconds per step (value and parameter gradients), float32, train mode: ``dbprop`` / ``autograd``: the
    exact Jacobian penalty (logits); ``dbprop_double_backprop`` / ``autograd_double_backprop``: DoubleBackpropLoss
    (cross-entropy + weight·‖∇x CE‖²); ``plain``: cross-entropy, forward and backward. Also the peak RSS (MB)
    above the RSS before the warm-up call."""
    make, side, _ = MODELS[name]
    torch.manual_seed(0)
    model = with_classes(_no_dropout(make()), C).train()
    x = torch.randn(B, 3, side, side)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    head = P.JacobianFrobenius("logits")
    params = [p for p in model.parameters() if p.requires_grad]
    double_backprop = (dbprop.DoubleBackpropLoss(model, DOUBLE_BACKPROP_WEIGHT, strict=True)
                       if contender == "dbprop_double_backprop" else None)
    value = {
        "dbprop": lambda: Fn.jacobian_penalty(model, x, output="logits", strict=True),
        "autograd": lambda: fallback.autograd_penalty(model, head, x).mean(),
        "dbprop_double_backprop": lambda: double_backprop(x, y),
        "autograd_double_backprop": lambda: fallback.autograd_penalty(
            model, P.DoubleBackprop(y, DOUBLE_BACKPROP_WEIGHT, "cross_entropy"), x).mean(),
        "plain": lambda: torch.nn.functional.cross_entropy(model(x), y),
    }[contender]

    def run():
        v = value()
        return v, torch.autograd.grad(v, params, allow_unused=True)

    base = reset_peak_rss()
    run()  # warm-up: tracing, self-check, formulation and chunk timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"model": name, "contender": contender, "median_s": statistics.median(times), "runs": times,
            "peak_mb": max(0.0, peak_rss_mb() - base)}


def with_classes(model: torch.nn.Module, C: int) -> torch.nn.Module:
    """``model`` with a ``C``-class head: timm's ``reset_classifier``, else its last ``nn.Linear`` replaced (the
    suite's constructors build torchvision models with ``test_real_models.C`` classes)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(C)
        return model
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    if last.out_features != C:
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], torch.nn.Linear(last.in_features, C, bias=last.bias is not None))
    return model


def speed_row(name: str, fresh: bool, repeats: int) -> dict:
    """Two rounds of every contender (the order reversed in the second), each in a fresh process if ``fresh``;
    the median over the rounds of each contender's median seconds and peak MB, and the ratios."""
    contenders = PLAIN_CONTENDERS if name in NO_AUTOGRAD else CONTENDERS
    res = {}
    for rep in range(2 if fresh else 1):
        for contender in contenders if rep % 2 == 0 else tuple(reversed(contenders)):
            if fresh:
                out = subprocess.run([sys.executable, __file__, "--one", name, contender, "--repeats",
                                      str(repeats)], capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                    {"median_s": float("nan"), "peak_mb": float("nan"), "error": out.stderr[-300:]}
                if "error" in r:
                    print(json.dumps({"model": name, "contender": contender, "error": r["error"]}), flush=True)
            else:
                r = time_contender(name, contender, repeats)
            res.setdefault(contender, []).append((r["median_s"], r["peak_mb"]))
    med = {c: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for c, v in res.items()}
    row = {"model": name, "state": "fresh" if fresh else "warm"}
    for c in contenders:
        row[f"{c}_s"], row[f"{c}_mb"] = round(med[c][0], 4), round(med[c][1], 1)
    if name in NO_AUTOGRAD:  # time of a penalty step in plain training steps (> 1: slower than a plain step)
        row["jacobian_over_plain"] = round(med["dbprop"][0] / med["plain"][0], 3)
        row["double_backprop_over_plain"] = round(med["dbprop_double_backprop"][0] / med["plain"][0], 3)
    else:
        row["speedup"] = round(med["autograd"][0] / med["dbprop"][0], 3)
        row["double_backprop_speedup"] = round(med["autograd_double_backprop"][0] / med["dbprop_double_backprop"][0], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=sorted(MODELS))
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="each contender in its own process")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.one:
        print(json.dumps(time_contender(args.one[0], args.one[1], args.repeats)))
        return
    print(f"torch {torch.__version__}, CPU {cpu_name()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for name in args.models:
        row = coverage_row(name)
        print(json.dumps(row), flush=True)
        if args.speed and "error" not in row:
            print(json.dumps(speed_row(name, args.fresh, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
