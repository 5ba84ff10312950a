"""Analysis tools: saliency and robustness measurements, measured robustness by attacks (foolbox, optional),
and operation counts."""
from .attacks import empirical_robustness, make_attack
from .robustness import (alignment, binarized_alignment, homogeneous_decomposition, linearized_robustness,
                         logits_and_input_gradients, saliency)

__all__ = ["saliency", "alignment", "linearized_robustness", "binarized_alignment", "homogeneous_decomposition",
           "logits_and_input_gradients", "empirical_robustness", "make_attack"]
