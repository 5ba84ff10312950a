"""Stand-ins for torchvision's StochasticDepth and timm's DropPath (neither is installed here): the same class
names, module paths and forward semantics (row-wise or batch-wise Bernoulli(1 − p) mask, divided by 1 − p),
copied from torchvision 0.29.1 (torchvision/ops/stochastic_depth.py) and timm 1.0 (timm/layers/drop.py)."""
import torch
from torch import nn


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        p, mode, training = self.p, self.mode, self.training
        if p < 0.0 or p > 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
        if mode not in ["batch", "row"]:
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
        if not training or p == 0.0:
            return input
        survival_rate = 1.0 - p
        size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
        noise = torch.empty(size, dtype=input.dtype, device=input.device)
        noise = noise.bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return input * noise


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        drop_prob, training, scale_by_keep = self.drop_prob, self.training, self.scale_by_keep
        if drop_prob == 0. or not training:
            return x
        keep_prob = 1 - drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor


StochasticDepth.__module__ = "torchvision.ops.stochastic_depth"
DropPath.__module__ = "timm.layers.drop"
