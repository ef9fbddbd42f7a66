"""Process-group plumbing: who am I, start/stop the group, fail loudly (the collectives that run
inside the group are in ``simcot.parallel``).

Launchers (torchrun, the ``deepspeed`` launcher, SLURM's srun via ``launchers/slurm``) set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain ``simcot train`` is one process.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def uses_deepspeed(cfg) -> bool:
    d = cfg.deepspeed
    return d.enabled or bool(d.config) or d.zero_stage > 0 or dist_env().world > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALE_LOCK_MINUTES = 10  # a torch extension build holds its lock for a minute or two


def extension_build_locks() -> list[Path]:
    """The lock files of torch's JIT extension builds (DeepSpeed's ops): `$TORCH_EXTENSIONS_DIR/<op>/lock`,
    else `~/.cache/torch_extensions/<python>_<accelerator>/<op>/lock` (torch.utils.cpp_extension)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return sorted(Path(env).glob("*/lock"))
    from torch.utils.cpp_extension import get_default_build_root

    return sorted(Path(get_default_build_root()).glob("*/*/lock"))


def warn_stale_build_locks(now: float | None = None) -> list[Path]:
    """One line on stderr per build lock older than STALE_LOCK_MINUTES; returns them.

    A process killed while it JIT-builds an op (DeepSpeed builds its CPU shared-memory op in
    `init_distributed`) leaves the lock behind, and every later build of that op waits for it
    without end and without a word: a run that hangs at start-up. The lock is not removed here, as
    another process may be building right now; the line says which file and how old it is."""
    now = time.time() if now is None else now
    stale = []
    for lock in extension_build_locks():
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # removed meanwhile: its build ended
            continue
        if age > STALE_LOCK_MINUTES * 60:
            stale.append(lock)
            print(f"simcot: warning: {lock} is {age / 60:.0f} minutes old: a build of the torch extension "
                  f"'{lock.parent.name}' was killed while holding it, and DeepSpeed waits on it forever when it "
                  "builds that op; delete the file if no build is running", file=sys.stderr, flush=True)
    return stale


def init_distributed(cfg) -> DistInfo:
    """Start the process group when DeepSpeed is in use (gloo on CPU, nccl on GPU)."""
    info = dist_env()
    if not uses_deepspeed(cfg):
        return info
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if info.world == 1:  # a single process still needs an address to rendezvous with itself
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        if info.local_rank == 0:  # one line per machine, before DeepSpeed may wait on a stale lock
            warn_stale_build_locks()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=cfg.deepspeed.timeout_minutes))
    return dist_env()


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while its peer is still in
    the last collective can abort ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def fail_loudly(rank: int, err: BaseException) -> None:
    """Report a rank's error on stderr, then end the process at once.

    A rank that raised must not wait in a collective (or in destroy_process_group) for peers that
    will never join: the launcher sees the non-zero exit and stops the other ranks.
    """
    import traceback

    traceback.print_exception(err, file=sys.stderr)
    print(f"simcot: rank {rank} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def maybe_inject_fault(rank: int, step: int) -> None:
    """Testing aids: SIMCOT_FAIL_AT='<rank>:<step>' makes that rank raise at that optimizer step;
    SIMCOT_KILL_AT='<step>' makes rank 0 SIGKILL its process group there (the ranks torchrun
    started: a job that dies mid-training, at a known step, with no chance to clean up)."""
    spec = os.environ.get("SIMCOT_FAIL_AT")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected failure (SIMCOT_FAIL_AT={spec})")
    if rank == 0 and os.environ.get("SIMCOT_KILL_AT") == str(step):
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)
