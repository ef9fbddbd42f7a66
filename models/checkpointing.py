"""Activation checkpointing that survives the latent rollout.

Hugging Face's gradient checkpointing recomputes whole decoder layers and therefore switches the
KV cache off in training: the rollout, which runs every latent step on the cache, would break.
For latent methods simcot recomputes only the MLP blocks (non-reentrant ``torch.utils.checkpoint``):
they hold most of a layer's activations (3 x intermediate width per token against ~10 x hidden
for the rest) and never touch the cache. Methods without latents use Hugging Face's full-layer
checkpointing, non-reentrant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from simcot.models.decoding import unwrap


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def checkpoint_mlps(lm: nn.Module) -> int:
    """Recompute every decoder layer's MLP in backward; returns how many were wrapped."""
    n = 0
    for name, module in unwrap(lm).named_modules():
        if name.endswith(".mlp") and not getattr(module, "_simcot_checkpointed", False):
            module.forward = _checkpointed(module.forward)
            module._simcot_checkpointed = True
            n += 1
    if n == 0:
        raise ValueError(f"no '.mlp' blocks found in {type(unwrap(lm)).__name__} to checkpoint")
    return n


def enable_checkpointing(lm: nn.Module, latent: bool) -> None:
    if latent:
        checkpoint_mlps(lm)
    else:
        unwrap(lm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
