"""Using a ZeRO-3-partitioned parameter outside its module's forward.

Under DeepSpeed ZeRO-3 every parameter is an empty shard (``numel() == 0``) except inside its
owning module's forward, where a hook all-gathers it. A fused op that reads ``lm_head.weight``
directly (the fused linear cross-entropy never calls ``lm_head``) must gather it itself.
"""

from __future__ import annotations

import contextlib

import torch

from simcot.parallel import is_partitioned


@contextlib.contextmanager
def gathered(*params: torch.Tensor | None):
    """Full parameters inside the block: ``deepspeed.zero.GatheredParameters(params,
    modifier_rank=None)`` for those that are ZeRO-3 shards right now, else nothing (None skipped).

    Parameters already whole are left to whoever gathered them. That includes the common case:
    inside ``engine(...)``'s forward, merely reading ``lm_head.weight`` makes DeepSpeed fetch it
    and register it as an external parameter of the running module, which releases it after its
    forward (re-partitioning it here as well would fail: "still active in submodules"). Outside
    an engine forward (evaluation, a direct call, a backward that recomputes) nothing fetches it,
    and this does. The status is the same on every rank (ranks run the same module sequence),
    so every rank makes the same collective calls.

    The gather is one collective per call, issued by every rank, so whatever runs inside may
    loop a rank-dependent number of times as long as it issues no collectives itself (the
    fused cross-entropy's chunk loop issues none). The weight gradient the op returns is
    full-shape; ZeRO-3's gradient hook reduce-scatters it into the partition on backward.
    """
    ps = [p for p in params if is_partitioned(p)]
    if ps:  # only reached when DeepSpeed already partitioned these parameters, so it is imported
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        ps = [p for p in ps if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not ps:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
        yield
