"""Small random networks covering every supported layer and option, and inputs away from ReLU kinks."""
import torch
from torch import nn


def _classifier(features: nn.Sequential, in_shape, num_classes: int) -> nn.Sequential:
    with torch.no_grad():
        n = features(torch.zeros(1, *in_shape, dtype=next(features.parameters()).dtype)).numel()
    return nn.Sequential(features, nn.Linear(n, num_classes))


def mlp(C=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.LeakyReLU(0.2),
                         nn.Dropout(0.3), nn.Identity(), nn.Linear(8, C)).eval(), (3, 4)


def conv2d(C=5):
    f = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.1),
                      nn.AvgPool2d(2, ceil_mode=True), nn.Flatten())
    return _classifier(f, (2, 8, 8), C), (2, 8, 8)


def conv2d_options(C=3):
    f = nn.Sequential(nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2), nn.ReLU(),
                      nn.Conv2d(6, 6, 4, padding="same"), nn.LeakyReLU(0.3),
                      nn.Sequential(nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0)), nn.ReLU(),
                                    nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)),
                      nn.Identity(), nn.MaxPool2d(3, stride=1, padding=1, dilation=1, ceil_mode=True), nn.Flatten())
    return _classifier(f, (4, 9, 9), C), (4, 9, 9)


def conv1d(C=4):
    f = nn.Sequential(nn.Conv1d(3, 5, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool1d(3, stride=2, padding=1),
                      nn.Conv1d(5, 4, 3, dilation=2, padding="same"), nn.LeakyReLU(0.05),
                      nn.AvgPool1d(2), nn.Conv1d(4, 4, 2, padding="valid", bias=False), nn.ReLU(), nn.Flatten())
    return _classifier(f, (3, 30), C), (3, 30)


def dropout_train(C=4):
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.4), nn.Linear(10, 10), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(10, C)).train(), (6,)


def critic():
    return nn.Sequential(nn.Linear(5, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.LeakyReLU(-0.5), nn.Linear(8, 1)), (5,)


NETS = {"mlp": mlp, "conv2d": conv2d, "conv2d_options": conv2d_options, "conv1d": conv1d,
        "dropout_train": dropout_train}


def build(name, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    factory = critic if name == "critic" else NETS[name]
    model, shape = factory(**kw)
    return model.to(dtype), shape


def min_preactivation(model, x):
    """Smallest |z| entering any (leaky) ReLU: the distance of x's linear region to a kink."""
    found = []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append(i[0].abs().min()))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    try:
        with torch.no_grad():
            state = torch.get_rng_state()
            model(x)
            torch.set_rng_state(state)
    finally:
        for h in hooks:
            h.remove()
    return min(found).item() if found else float("inf")


def draw_input(model, shape, batch=3, seed=1, dtype=torch.float64):
    """Random input whose pre-activations all stay at least 1e-6 away from the ReLU kink."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        x = torch.randn(batch, *shape, generator=g, dtype=dtype)
        if min_preactivation(model, x) > 1e-6:
            return x
    raise RuntimeError("could not draw an input away from the kinks")
