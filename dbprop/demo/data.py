"""The demo's data and network: scikit-learn's bundled 8×8 digits and the thesis's MNIST network (Table 4.1)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def thesis_network(num_classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """Thesis Table 4.1 sized for 8×8 inputs: three (3×3 conv + ReLU + 2×2 max-pool) stages with 32/64/128
    maps (8→4→2→1), dense 128 + ReLU, dropout, dense ``num_classes``."""
    stages = []
    for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
        stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*stages, nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(128, num_classes))


def load_digits(seed: int, test_fraction: float = 0.25) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``: scikit-learn's digits (shipped with it, no download) as
    ``(N, 1, 8, 8)`` float32 in [0, 1], split at random by ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise SystemExit("the demo needs scikit-learn: pip install 'dbprop[demo]'") from e
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def class_separation(data) -> float:
    """Median over the test digits x of half the L2 distance to the nearest training digit x' of another class.
    A classifier labelling both correctly has a boundary between them, so ρ(x) + ρ(x') ≤ ‖x − x'‖: it cannot make
    both more robust than this half distance."""
    (x_train, y_train), (x_test, y_test) = data
    distance = torch.cdist(x_test.flatten(1), x_train.flatten(1))
    distance[y_test[:, None] == y_train[None]] = float("inf")
    return distance.min(1).values.div(2).median().item()
