"""Custom ops, each beside its plain PyTorch reference and a Triton kernel.

- :func:`fused_linear_cross_entropy`: ``CE(hidden @ weight.T, target)`` without materialising
  the (N x V) logits (``linear_cross_entropy.py``, kernel in ``linear_cross_entropy_triton.py``).
- :func:`latent_feedback`: the rollout's next input per sequence, the projected hidden state
  while thinking, else the token's embedding (``latent_feedback.py``, ``latent_feedback_triton.py``).
- :func:`gathered`: full ZeRO-3 parameters for an op that reads them outside their module.

Every op takes ``impl="auto"|"triton"|"torch"|"reference"``; ``set_default_impl`` or the
``SIMCOT_KERNELS`` environment variable choose what "auto" means (``dispatch.py``).
"""

from simcot.kernels.dispatch import default_impl, set_default_impl
from simcot.kernels.latent_feedback import latent_feedback, latent_feedback_reference
from simcot.kernels.linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from simcot.kernels.zero3 import gathered

__all__ = ["default_impl", "fused_linear_cross_entropy", "gathered", "latent_feedback", "latent_feedback_reference",
           "linear_cross_entropy_reference", "set_default_impl"]
