"""Using a ZeRO-3-partitioned parameter outside its module's forward.

Under DeepSpeed ZeRO-3 every parameter is an empty shard (``numel() == 0``) except inside its
owning module's forward, where a hook all-gathers it. A fused op that reads ``lm_head.weight``
directly (the fused linear cross-entropy never calls ``lm_head``) must gather it itself.
"""

from __future__ import annotations

import contextlib

import torch


def is_partitioned(p: torch.Tensor | None) -> bool:
    return p is not None and hasattr(p, "ds_id")  # set on every parameter ZeRO-3 manages


@contextlib.contextmanager
def gathered(*params: torch.Tensor | None):
    """Full parameters inside the block: ``deepspeed.zero.GatheredParameters(params,
    modifier_rank=None)`` when any is ZeRO-3-partitioned, else nothing at all (None is skipped).

    The gather is one collective per call, issued by every rank, so whatever runs inside may
    loop a rank-dependent number of times as long as it issues no collectives itself (the
    fused cross-entropy's chunk loop issues none). Gradients are fine when the op computes its
    weight gradient inside the block (the fused cross-entropy does, for mean and sum): the
    gradient is a full-shape tensor that ZeRO-3's reduce hook partitions on backward.
    """
    ps = [p for p in params if is_partitioned(p)]
    if not ps:
        yield
        return
    import deepspeed  # only reached when DeepSpeed already partitioned these parameters

    with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
        yield
