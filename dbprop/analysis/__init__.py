"""Analysis tools: saliency and robustness measurements, and operation counts."""
from .robustness import (alignment, binarized_alignment, homogeneous_decomposition, linearized_robustness,
                         logits_and_input_gradients, saliency)

__all__ = ["saliency", "alignment", "linearized_robustness", "binarized_alignment", "homogeneous_decomposition",
           "logits_and_input_gradients"]
