"""Collectives and ZeRO-3 detection: the one place every layer (kernels, models, train) asks
"how many ranks are there", "does every rank agree" and "is this parameter a ZeRO-3 shard".

Everything here is a no-op without a process group of more than one rank, so single-process
code calls it unconditionally. Starting and stopping the group is the launcher side's business
(``simcot.train.engines.distributed``); this module only talks to a group that exists.

Under ZeRO-3 every forward gathers parameters with a collective, so all ranks must run the same
number of forwards: loops whose length depends on a rank's data (latent steps, decode steps,
evaluation batches) take their count from :func:`rank_max` or stop by :func:`decoding_done`.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    return t.cuda() if dist.get_backend() == "nccl" else t  # nccl reduces only CUDA tensors


def rank_max(n: int) -> int:
    """The largest `n` over the ranks: under ZeRO-3 every rank must run as many forward passes."""
    if not is_distributed():
        return n
    t = _on_backend(torch.tensor([n], dtype=torch.long))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank gets the same dict; the keys must agree)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = _on_backend(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def decoding_done(done: torch.Tensor, synced: bool = True, group=None) -> bool:
    """The stop rule of every batched decode loop: True once every row of `done` (B,) bool is
    finished. With `synced` and several ranks in `group`, only once every rank's rows are (one
    all-reduce per call): ranks decoding in lockstep under ZeRO-3 must make the same number of
    forwards. `synced=False` is for a loop that runs on one rank alone."""
    if synced and is_distributed(group):
        t = (~done.all()).to(torch.int32)  # 1 while this rank still has rows to decode
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return not bool(t.item())
    return bool(done.all())


def is_partitioned(p: torch.Tensor | None) -> bool:
    """True when DeepSpeed ZeRO-3 keeps only a shard of `p` outside its module's forward."""
    return p is not None and hasattr(p, "ds_id")  # set on every parameter ZeRO-3 manages


def any_partitioned(params: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
    """True when any parameter of a module (or of an iterable of tensors) is a ZeRO-3 shard."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    return any(is_partitioned(p) for p in params)
