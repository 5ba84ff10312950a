"""Benchmark workloads: the thesis MNIST network (Table 4.1), the "WideCIFAR" plain ReLU CNN, an MLP and a 1-d
conv net on spectra-like input. ``make(name, C)`` returns ``(model, input shape)``."""
import torch
from torch import nn


def _head(features: nn.Sequential, shape, hidden, C, dropout=0.0):
    with torch.no_grad():
        n = features(torch.zeros(1, *shape)).numel()
    layers = [features, nn.Linear(n, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, C))


def thesis_mnist(C=10):
    f = []
    for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
        f += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return _head(nn.Sequential(*f, nn.Flatten()), (1, 28, 28), 128, C, dropout=0.5), (1, 28, 28)


def wide_cifar(C=10):
    f, c_in = [], 3
    for c_out, stride in ((32, 1), (64, 2), (64, 1), (32, 1), (32, 1), (64, 2)):
        f += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
        c_in = c_out
    return _head(nn.Sequential(*f, nn.Flatten()), (3, 32, 32), 512, C), (3, 32, 32)


def cifar_cnn(C=10):
    """The CIFAR-like CNN of issue 10: convs 32/64/64 with strides 1/2/2, dense 64."""
    f, c_in = [], 3
    for c_out, stride in ((32, 1), (64, 2), (64, 2)):
        f += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
        c_in = c_out
    return _head(nn.Sequential(*f, nn.Flatten()), (3, 32, 32), 64, C), (3, 32, 32)


def readme_example(C=10):
    """The network of the README's usage example."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 14 * 14, C)), (1, 28, 28)


def mlp(C=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, C)), (1, 28, 28)


def spectra(C=10):
    f, c_in = [], 1
    for c_out, k, stride in ((16, 7, 1), (32, 5, 5), (32, 5, 1), (64, 5, 3)):
        f += [nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2), nn.ReLU()]
        c_in = c_out
    return _head(nn.Sequential(*f, nn.MaxPool1d(2), nn.Flatten()), (1, 2000), 128, C), (1, 2000)


NETWORKS = {"thesis_mnist": thesis_mnist, "wide_cifar": wide_cifar, "cifar_cnn": cifar_cnn,
            "readme_example": readme_example, "mlp": mlp, "spectra": spectra}


def make(name, C=10, seed=0):
    torch.manual_seed(seed)
    model, shape = NETWORKS[name](C)
    return model.eval(), shape
