"""dbprop: exact, fast double backpropagation for PyTorch models traced into DAG programs: (leaky-)ReLU and
smooth activations, train- and eval-mode BatchNorm, pooling, and any other module as an exact opaque node.

Penalties with input derivatives (Jacobian norms, gradient penalties, double backprop, saliency
regularisers) computed by the explicit forward, backward, backward-backward and forward-backward passes
of Etmann (2019), with the accumulated-eta algorithm for exact Jacobian penalties.
"""
import torch  # noqa: F401  (must be imported before the native extension)

from . import analysis, backends, functional, memory
from .backends import backend_info, native_available
from .errors import UnsupportedModelError
from .core import FallbackWarning
from .memory import empty_cache, set_workspace_enabled, workspace_stats
from .modules import (AlignmentPenalty, DoubleBackpropLoss, GradientPenalty, JacobianPenalty, OutputGradientPenalty,
                      RelevancePenalty, SpectralNormPenalty)
from .program import Program, compile_model

backends.check_native_tables()

__version__ = "0.2.0"

__all__ = ["JacobianPenalty", "OutputGradientPenalty", "DoubleBackpropLoss", "SpectralNormPenalty",
           "RelevancePenalty", "AlignmentPenalty", "GradientPenalty", "functional", "compile_model", "Program",
           "UnsupportedModelError", "FallbackWarning", "analysis", "native_available", "backend_info", "memory", "empty_cache", "workspace_stats",
           "set_workspace_enabled", "__version__"]
