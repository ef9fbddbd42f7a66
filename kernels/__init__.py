"""Custom ops, each beside its plain PyTorch reference.

- :func:`fused_linear_cross_entropy`: ``CE(hidden @ weight.T, target)`` without materialising
  the (N x V) logits.
"""

from simcot.kernels.linear_cross_entropy import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy"]
