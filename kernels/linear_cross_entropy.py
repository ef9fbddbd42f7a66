"""Linear + cross-entropy: the public op and its reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                                   z_loss=0.0, label_smoothing=0.0):
    """Materialises the logits: the definition every other path is tested against."""
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = target != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits, -1).pow(2) * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)


def fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                               z_loss=0.0, label_smoothing=0.0, impl="auto"):
    return linear_cross_entropy_reference(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                          reduction=reduction, z_loss=z_loss, label_smoothing=label_smoothing)
