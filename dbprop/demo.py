"""The demo: the MNIST network of the thesis (Table 4.1) on scikit-learn's 8×8 digits, trained once plainly
and once with an exact Jacobian penalty; prints test accuracy, mean penalty and time per step of each run."""
from __future__ import annotations

import argparse
import time
from typing import Dict, Optional

import torch
from torch import nn

from .modules import JacobianPenalty


def thesis_network(num_classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """Thesis Table 4.1 sized for 8×8 inputs: three (3×3 conv + ReLU + 2×2 max-pool) stages with 32/64/128
    maps (8→4→2→1), dense 128 + ReLU, dropout, dense ``num_classes``."""
    stages = []
    for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
        stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*stages, nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(128, num_classes))


def load_digits(seed: int, test_fraction: float = 0.25):
    """scikit-learn's digits (shipped with the package, no download), scaled to [0, 1], split by ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the demo needs scikit-learn: pip install 'dbprop[demo]'") from e
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


class _NoBar:  # pragma: no cover - used only without tqdm
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(desc: str, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(desc=desc, total=total, leave=True)


def train(lam: float, epochs: int, batch_size: int, seed: int, data, desc: str) -> Dict[str, float]:
    """Train with ``cross_entropy + lam · JacobianPenalty`` (``lam = 0``: plain training)."""
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = thesis_network()
    penalty = JacobianPenalty(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps, step_time = 0, 0.0
    n_batches = (len(y_train) + batch_size - 1) // batch_size
    g = torch.Generator().manual_seed(seed)
    bar = _progress(desc, epochs * n_batches)
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=g)
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x, y = x_train[idx], y_train[idx]
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            if lam > 0:
                loss = loss + lam * penalty(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_time += time.perf_counter() - t0
            steps += 1
            bar.update(1)
    bar.close()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        mean_penalty = penalty(x_test).item()
    return {"lambda": lam, "accuracy": accuracy, "penalty": mean_penalty, "ms_per_step": 1e3 * step_time / steps}


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dbprop demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lam", type=float, default=0.01, help="weight of the Jacobian penalty in the second run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_digits(args.seed)
    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} test, 8x8; thesis network; "
          f"{args.epochs} epochs, batch {args.batch_size}")
    rows = [train(0.0, args.epochs, args.batch_size, args.seed, data, "plain"),
            train(args.lam, args.epochs, args.batch_size, args.seed, data, f"+{args.lam} JacobianPenalty")]
    print(f"\n{'run':<28}{'test accuracy':>15}{'mean ||J||_F^2':>16}{'ms/step':>10}")
    for r in rows:
        name = "plain cross-entropy" if r["lambda"] == 0 else f"+ {r['lambda']} * JacobianPenalty"
        print(f"{name:<28}{r['accuracy']:>15.4f}{r['penalty']:>16.4f}{r['ms_per_step']:>10.2f}")
