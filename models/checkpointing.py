"""Activation checkpointing that survives the latent rollout.

Hugging Face's gradient checkpointing recomputes whole decoder layers and therefore switches the
KV cache off in training: the rollout, which runs every latent step on the cache, would break.
For latent methods simcot recomputes only the MLP blocks (non-reentrant ``torch.utils.checkpoint``):
they hold most of a layer's activations (3 x intermediate width per token against ~10 x hidden
for the rest) and never touch the cache. Methods without latents use Hugging Face's full-layer
checkpointing, non-reentrant.

A switch that changes what a block computes (the shared step decoder turns its LoRA hooks on for
decoder passes only) is off again when backward recomputes the block; objects holding such a
switch (an ``_active`` attribute) register with ``register_switch``, and every recompute runs
with the switches as they were in the original forward.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from simcot.models.decoding import unwrap

_SWITCHES: "weakref.WeakSet" = weakref.WeakSet()


def register_switch(obj) -> None:
    """`obj._active` changes forwards: recomputes see the value the original forward saw."""
    _SWITCHES.add(obj)


def _recompute_context():
    saved = {o: o._active for o in _SWITCHES}  # read at forward time

    @contextlib.contextmanager
    def as_in_forward():
        now = {o: o._active for o in saved}
        for o, v in saved.items():
            o._active = v
        try:
            yield
        finally:
            for o, v in now.items():
                o._active = v

    return contextlib.nullcontext(), as_in_forward()


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
            return checkpoint(forward, *args, use_reentrant=False, context_fn=_recompute_context, **kwargs)
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
