"""Real torchvision / timm architectures (random weights): native-node fraction, fallback, largest error of the
exact Jacobian penalty against autograd double backprop (float64, relative to the global gradient scale), and
optionally the speed of dbprop against autograd (float32, train mode).

Needs torchvision and timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``)::

    python bench/realmodels.py                 # coverage and exactness table
    python bench/realmodels.py --speed         # + speed, both contenders alternating in one process
    python bench/realmodels.py --models tv_convnext_tiny --speed --fresh   # one contender per fresh process
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

from test_real_models import MODELS, _no_dropout, largest_error, native_fraction  # noqa: E402


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
    """Seconds per exact-Jacobian step (value and parameter gradients), float32, train mode."""
    make, side, _ = MODELS[name]
    torch.manual_seed(0)
    model = _no_dropout(make()).train()
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(C)
    x = torch.randn(B, 3, side, side)
    head = P.JacobianFrobenius("logits")

    def run():
        if contender == "dbprop":
            v = Fn.jacobian_penalty(model, x, output="logits", strict=True)
        else:
            v = fallback.autograd_penalty(model, head, x).mean()
        grads = torch.autograd.grad(v, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return v, grads

    run()  # warm-up: tracing, self-check, formulation and chunk timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"model": name, "contender": contender, "median_s": statistics.median(times), "runs": times}


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
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for name in args.models:
        row = coverage_row(name)
        print(json.dumps(row), flush=True)
        if args.speed and "error" not in row:
            res = {}
            for rep in range(2 if args.fresh else 1):
                for contender in ("autograd", "dbprop") if rep % 2 == 0 else ("dbprop", "autograd"):
                    if args.fresh:
                        out = subprocess.run([sys.executable, __file__, "--one", name, contender, "--repeats",
                                              str(args.repeats)], capture_output=True, text=True)
                        r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                            {"median_s": float("nan"), "error": out.stderr[-300:]}
                    else:
                        r = time_contender(name, contender, args.repeats)
                    res.setdefault(contender, []).append(r["median_s"])
            a, d = statistics.median(res["autograd"]), statistics.median(res["dbprop"])
            print(json.dumps({"model": name, "autograd_s": round(a, 4), "dbprop_s": round(d, 4),
                              "speedup": round(a / d, 3), "state": "fresh" if args.fresh else "warm"}), flush=True)


if __name__ == "__main__":
    main()
