"""``python -m dbprop demo``: a small reproduction of Etmann et al. (ICML 2019) on scikit-learn's 8×8 digits."""
from .data import load_digits, thesis_network
from .study import main

__all__ = ["main", "thesis_network", "load_digits"]
