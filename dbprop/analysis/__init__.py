"""Analysis tools: operation counts (and, later, robustness and saliency measurements)."""
