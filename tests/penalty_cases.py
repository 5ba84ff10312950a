"""The registry of penalty cases: every public penalty (its module in dbprop/modules.py, its function in
dbprop/functional.py) and every penalty head of dbprop/penalties.py, with the option sets they are tested at.

A case calls the function as ``function(model, x, *labels, **options)`` and the module as
``module(model, **options)(x, *labels)`` (``reduction`` / ``backend`` added by the tests); ``head(labels)`` is the
reference head that ``dbprop.fallback.autograd_penalty`` evaluates. tests/test_penalties.py runs every case on
every backend, device and reduction and fails for a penalty without a case."""
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch

import dbprop
from dbprop import functional as F
from dbprop import penalties as P

from nets import NETS

CLASSIFIERS = tuple(sorted(NETS))


class Case(NamedTuple):
    function: Callable  # the dbprop.functional form
    module: type  # the dbprop.modules form
    options: Dict[str, Any]  # keyword options, the same for both forms
    head: Callable[[Any], P.Penalty]  # labels -> the reference head
    labels: Optional[Callable[[int, int, str], Any]] = None  # (B, C, device) -> the positional label argument
    nets: Tuple[str, ...] = CLASSIFIERS  # tests/nets.py models it runs on ("critic": scalar critics)

    def label_args(self, B, C, device):
        """The positional arguments after ``x``: ``()`` or ``(labels,)``."""
        return () if self.labels is None else (self.labels(B, C, device),)

    def reference(self, args):
        """The reference head for the positional arguments ``args`` (from :meth:`label_args`)."""
        return self.head(args[0] if args else None)


def labels(B, C, device="cpu"):
    """Integer labels hitting the first, second and last class."""
    return torch.tensor([1, 0, C - 1] * B, device=device)[:B]


def targets(B, C, device="cpu"):
    """Float regression targets (B, C) for the "mse" double-backprop loss."""
    return torch.linspace(-1, 1, B * C, dtype=torch.float64, device=device).reshape(B, C)


def index_one(B, C, device="cpu"):
    """One output index shared by all samples (a Python int)."""
    return 1


CASES = {
    "jacobian-logits": Case(F.jacobian_penalty, dbprop.JacobianPenalty, {}, lambda y: P.JacobianFrobenius("logits")),
    "jacobian-softmax": Case(F.jacobian_penalty, dbprop.JacobianPenalty, {"output": "softmax"},
                             lambda y: P.JacobianFrobenius("softmax")),
    "jacobian-softmax-chunk2": Case(F.jacobian_penalty, dbprop.JacobianPenalty, {"output": "softmax", "chunk_size": 2},
                                    lambda y: P.JacobianFrobenius("softmax")),
    "jacobian-logits-chunk1": Case(F.jacobian_penalty, dbprop.JacobianPenalty, {"chunk_size": 1},
                                   lambda y: P.JacobianFrobenius("logits")),
    "random-logits": Case(F.jacobian_penalty, dbprop.JacobianPenalty,
                          {"estimator": "random", "num_projections": 3, "chunk_size": 2},
                          lambda y: P.JacobianFrobenius("logits", "random", 3)),
    "random-softmax": Case(F.jacobian_penalty, dbprop.JacobianPenalty,
                           {"output": "softmax", "estimator": "random", "num_projections": 2},
                           lambda y: P.JacobianFrobenius("softmax", "random", 2)),
    "output-gradient-logits": Case(F.output_gradient_penalty, dbprop.OutputGradientPenalty, {},
                                   lambda y: P.OutputGradient("logits", y), labels),
    "output-gradient-softmax": Case(F.output_gradient_penalty, dbprop.OutputGradientPenalty, {"output": "softmax"},
                                    lambda y: P.OutputGradient("softmax", y), index_one),
    "double-backprop-ce": Case(F.double_backprop_loss, dbprop.DoubleBackpropLoss, {"weight": 0.7},
                               lambda y: P.DoubleBackprop(y, 0.7), labels),
    "double-backprop-mse": Case(F.double_backprop_loss, dbprop.DoubleBackpropLoss, {"weight": 1.3, "loss": "mse"},
                                lambda y: P.DoubleBackprop(y, 1.3, "mse"), targets),
    "spectral-logits": Case(F.spectral_norm_penalty, dbprop.SpectralNormPenalty, {"power_iterations": 3},
                            lambda y: P.SpectralNorm("logits", 3)),
    "spectral-softmax": Case(F.spectral_norm_penalty, dbprop.SpectralNormPenalty, {"output": "softmax"},
                             lambda y: P.SpectralNorm("softmax", 1)),
    "relevance": Case(F.relevance_penalty, dbprop.RelevancePenalty, {"l1": 0.3, "l2": 0.8},
                      lambda y: P.Relevance(y, 0.3, 0.8), labels),
    "alignment": Case(F.alignment_penalty, dbprop.AlignmentPenalty, {}, lambda y: P.Alignment(y), labels),
    "gradient-center0": Case(F.gradient_penalty, dbprop.GradientPenalty, {"center": 0.0},
                             lambda y: P.GradientNorm(0.0), nets=("critic",)),
    "gradient-center1": Case(F.gradient_penalty, dbprop.GradientPenalty, {"center": 1.0},
                             lambda y: P.GradientNorm(1.0), nets=("critic",)),
}
