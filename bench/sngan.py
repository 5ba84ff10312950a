"""SN-GAN critic with the WGAN-GP gradient penalty: dbprop's ``GradientPenalty`` against the standard autograd loop.

The critic is DCGAN / SN-GAN style for 64×64 RGB images: four 4×4 stride-2 convolutions (3 → 64 → 128 → 256 → 512
channels, 64 → 4 pixels) and a 4×4 valid convolution to one score, each wrapped in
``torch.nn.utils.parametrizations.spectral_norm``, LeakyReLU(0.2) between them, no BatchNorm. The penalty is WGAN-GP's
``mean_b (‖∇x D(x̂_b)‖ − 1)²`` on interpolates ``x̂ = ε x_real + (1 − ε) x_fake``; one step is the penalty and its
gradients with respect to every critic parameter (the spectral-norm parametrizations' ``original`` weights and the
biases). Contenders:

* ``autograd``: ``g = autograd.grad(D(x̂).sum(), x̂, create_graph=True)``,
  ``((g.flatten(1).norm(dim=1) − 1)²).mean()``, then ``autograd.grad`` of that to the parameters;
* ``dbprop``: ``dbprop.GradientPenalty(D, center=1.0)(x̂)``, then ``autograd.grad`` to the parameters.

dbprop may not represent the spectral-norm parametrizations: it then FALLS BACK to autograd double backprop with a
``FallbackWarning``. The script records that warning and reports how dbprop ran (``native``: its program, with
the fraction of native nodes; ``fallback``: autograd, timed under ``dbprop_fallback_s`` and never as ``dbprop_s``);
``--strict`` passes ``strict=True`` so that a refusal is an error, reported as such, instead of a fallback.

Measurement as in bench/realmodels.py: float32, the critic in train mode (one power iteration per forward, as in
training), one warm-up step, then the median of ``--repeats`` steps and the peak RSS above the RSS before the
warm-up (CUDA: the allocator's peak); ``--fresh`` runs each contender in its own new process; two rounds with the
contenders alternating (the order reversed in the second), the medians of the rounds reported. Before timing, a
float64 exactness check on a small batch (the critic in eval mode, so that no power iteration moves the weights
between the two evaluations): dbprop against the autograd loop, the largest error of the value (relative) and of
any parameter gradient (relative to the largest gradient entry).

    python bench/sngan.py --fresh                       # B=64, 5 repeats, each contender in its own process
    python bench/sngan.py --fresh --strict              # dbprop without the autograd fallback
    python bench/sngan.py --fresh --no-spectral-norm    # the same critic without spectral_norm (comparison)
    python bench/sngan.py --repeats 2 --batch 8         # a quick check that everything runs
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
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dbprop  # noqa: E402
from bench.measure import cpu_name, peak_rss_mb, reset_peak_rss  # noqa: E402

CONTENDERS = ("autograd", "dbprop")


def critic(width: int = 64, slope: float = 0.2, sn: bool = True) -> nn.Sequential:
    """The SN-GAN / DCGAN critic for 64×64 RGB: (B, 3, 64, 64) → (B, 1); ``sn=False``: the same convolutions
    without spectral normalisation (the WGAN-GP critic of Gulrajani et al. without its normalisation layers)."""
    wrap = spectral_norm if sn else (lambda m: m)
    layers, c_in = [], 3
    for c_out in (width, 2 * width, 4 * width, 8 * width):
        layers += [wrap(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(slope)]
        c_in = c_out
    layers += [wrap(nn.Conv2d(c_in, 1, 4, 1, 0)), nn.Flatten()]
    return nn.Sequential(*layers)


def interpolates(batch: int, dtype=torch.float32, device="cpu", seed: int = 1) -> torch.Tensor:
    """WGAN-GP's ``x̂ = ε x_real + (1 − ε) x_fake``, ε uniform per sample (random stand-ins for both batches)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(batch, 3, 64, 64, generator=g, dtype=dtype) * 2 - 1
    fake = torch.randn(batch, 3, 64, 64, generator=g, dtype=dtype).tanh()
    eps = torch.rand(batch, 1, 1, 1, generator=g, dtype=dtype)
    return (eps * real + (1 - eps) * fake).to(device)


def autograd_gradient_penalty(model: nn.Module, x_hat: torch.Tensor) -> torch.Tensor:
    """The standard WGAN-GP penalty by autograd double backprop."""
    x = x_hat.detach().requires_grad_(True)
    g, = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    return ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()


class Contender:
    """One contender's penalty value on ``model``; ``mode`` says how dbprop ran once it has run (see ``step``)."""

    def __init__(self, name: str, model: nn.Module, strict: bool) -> None:
        self.name, self.model = name, model
        self.mode = "autograd" if name == "autograd" else None
        self.penalty = dbprop.GradientPenalty(model, center=1.0, strict=strict) if name == "dbprop" else None
        self.params = [p for p in model.parameters() if p.requires_grad]

    def value(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.penalty is None:
            return autograd_gradient_penalty(self.model, x_hat)
        if self.mode is not None:
            return self.penalty(x_hat)
        with warnings.catch_warnings(record=True) as caught:  # the first call decides (one warning per model)
            warnings.simplefilter("always", dbprop.FallbackWarning)
            value = self.penalty(x_hat)
        fell_back = [w for w in caught if issubclass(w.category, dbprop.FallbackWarning)]
        for w in caught:
            if not issubclass(w.category, dbprop.FallbackWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if fell_back:
            self.mode = f"fallback: {str(fell_back[0].message)[:240]}"
        else:
            program = dbprop.compile_model(self.model)
            native = sum(op.native for op in program.ops) / len(program.ops)
            self.mode = f"native: program of {len(program.ops)} nodes, {native:.0%} native"
        return value

    def step(self, x_hat: torch.Tensor):
        """The penalty and its gradients with respect to every parameter (zero for the last bias: ∇x D does not
        depend on it)."""
        v = self.value(x_hat)
        return v, torch.autograd.grad(v, self.params, allow_unused=True, materialize_grads=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_contender(name: str, repeats: int, batch: int, strict: bool, device: str = "cpu", sn: bool = True) -> dict:
    """Seconds per step (median of ``repeats`` after one warm-up step), float32, train mode, and peak memory."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = critic(sn=sn).to(dev).train()
    x_hat = interpolates(batch, device=dev)
    c = Contender(name, model, strict)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = reset_peak_rss()
    try:
        c.step(x_hat)  # warm-up: tracing, self-check, formulation timing
    except dbprop.UnsupportedModelError as e:  # strict=True and dbprop refused the critic
        return {"contender": name, "mode": f"refused: {str(e)[:240]}", "median_s": float("nan"),
                "peak_mb": float("nan"), "runs": []}
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        c.step(x_hat)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20 if dev.type == "cuda"
            else max(0.0, peak_rss_mb() - base))
    return {"contender": name, "mode": c.mode, "median_s": statistics.median(times), "runs": times, "peak_mb": peak}


def exactness(batch: int, strict: bool, device: str = "cpu", sn: bool = True) -> dict:
    """dbprop against the autograd loop in float64 (critic in eval mode: fixed spectral-norm estimates)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = critic(sn=sn).double().to(dev).eval()
    x_hat = interpolates(batch, torch.float64, dev, seed=2)
    ref = Contender("autograd", model, strict)
    c = Contender("dbprop", model, strict)
    try:
        v, g = c.step(x_hat)
    except dbprop.UnsupportedModelError as e:
        return {"check": "float64 exactness", "batch": batch, "mode": f"refused: {str(e)[:240]}"}
    r, w = ref.step(x_hat)
    scale = max(t.abs().max().item() for t in w)
    worst = max((a - b).abs().max().item() for a, b in zip(g, w)) / scale
    return {"check": "float64 exactness", "batch": batch, "mode": c.mode,
            "value_rel_err": abs(v.item() - r.item()) / abs(r.item()), "grad_err_vs_global_scale": worst}


def _one(name: str, args) -> dict:
    if not args.fresh:
        return time_contender(name, args.repeats, args.batch, args.strict, args.device, not args.no_spectral_norm)
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--repeats", str(args.repeats), "--batch",
           str(args.batch), "--device", args.device] + (["--strict"] if args.strict else []) + \
        (["--no-spectral-norm"] if args.no_spectral_norm else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"contender": name, "mode": f"error: {out.stderr[-300:]}", "median_s": float("nan"),
                "peak_mb": float("nan"), "runs": []}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fresh", action="store_true", help="each contender in its own process")
    ap.add_argument("--strict", action="store_true", help="dbprop with strict=True: no autograd fallback")
    ap.add_argument("--check-batch", type=int, default=4, help="batch of the float64 exactness check (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-spectral-norm", action="store_true",
                    help="the same critic without spectral_norm (a comparison: what dbprop compiles today)")
    ap.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.one:
        print(json.dumps(time_contender(args.one, args.repeats, args.batch, args.strict, args.device,
                                        not args.no_spectral_norm)))
        return
    info = {"torch": torch.__version__, "cpu": cpu_name(), "vector_unit": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "device": args.device, "dbprop": dbprop.__version__,
            "native_extension": dbprop.native_available(), "batch": args.batch, "repeats": args.repeats,
            "state": "fresh" if args.fresh else "warm", "strict": args.strict,
            "spectral_norm": not args.no_spectral_norm}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(json.dumps(info), flush=True)
    if args.check_batch:
        print(json.dumps(exactness(args.check_batch, args.strict, args.device, not args.no_spectral_norm)), flush=True)
    res = {}
    for rnd in range(2):
        for name in CONTENDERS if rnd == 0 else tuple(reversed(CONTENDERS)):
            r = _one(name, args)
            res.setdefault(name, []).append(r)
            print(json.dumps({"round": rnd, **{k: (round(v, 4) if isinstance(v, float) else v)
                                               for k, v in r.items() if k != "runs"}}), flush=True)
    row = {"critic": "SN-GAN 64x64" if not args.no_spectral_norm else "64x64 without spectral norm",
           "batch": args.batch}
    for name in CONTENDERS:
        runs = res[name]
        modes = sorted({r["mode"] for r in runs})
        median_s = statistics.median(r["median_s"] for r in runs)
        peak_mb = statistics.median(r["peak_mb"] for r in runs)
        if name == "dbprop":
            row["dbprop_mode"] = modes[0] if len(modes) == 1 else modes
            if not all(m.startswith("native") for m in modes):  # a fallback's time is autograd's, not dbprop's
                key = "dbprop_fallback" if all(m.startswith("fallback") for m in modes) else None
                if key:
                    row[f"{key}_s"], row[f"{key}_mb"] = round(median_s, 4), round(peak_mb, 1)
                continue
        row[f"{name}_s"], row[f"{name}_mb"] = round(median_s, 4), round(peak_mb, 1)
    if "dbprop_s" in row:
        row["speedup"] = round(row["autograd_s"] / row["dbprop_s"], 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
