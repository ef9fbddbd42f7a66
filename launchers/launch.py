"""`simcot launch`: print (and run) the right launcher line for a training config.

- ``deepspeed``: ``deepspeed --hostfile H --module simcot.launchers.cli train ...`` (ssh/pdsh to
  the hosts of the hostfile), or with ``--no_ssh`` one launcher per node (``--node_rank``).
- ``torchrun``: one ``torchrun --nnodes N --node_rank R --master_addr A`` per node (single node: just
  ``--nproc_per_node``).
- ``slurm``: ``sbatch launchers/slurm/train.sbatch`` (one srun per node, MASTER_ADDR from the
  node list).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

MODULE = "simcot.launchers.cli"


def slurm_script() -> Path:
    return Path(__file__).parent / "slurm" / "train.sbatch"


def launcher_line(config: str = "", launcher: str = "deepspeed", gpus: int = 1, nodes: int = 1, hostfile: str = "",
                  master_addr: str = "127.0.0.1", master_port: int = 29500, node_rank: int = 0, no_ssh: bool = False,
                  overrides: dict | None = None) -> list[str]:
    args = ["train"] + (["--config", config] if config else [])
    args += [f"--{k}={v}" for k, v in (overrides or {}).items()]
    if launcher == "deepspeed":
        line = ["deepspeed"]
        if hostfile:
            line += ["--hostfile", hostfile]
        if nodes > 1 or hostfile:
            line += ["--num_nodes", str(nodes)]
        line += ["--num_gpus", str(gpus), "--master_addr", master_addr, "--master_port", str(master_port)]
        if no_ssh:
            line += ["--no_ssh", "--node_rank", str(node_rank)]
        return line + ["--module", MODULE] + args
    if launcher == "torchrun":
        line = ["torchrun", "--nproc_per_node", str(gpus)]
        if nodes > 1:
            line += ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--master_addr", master_addr,
                     "--master_port", str(master_port)]
        else:
            line += ["--master_port", str(master_port)]
        return line + ["-m", MODULE] + args
    if launcher == "slurm":
        return ["sbatch", f"--nodes={nodes}", f"--gpus-per-node={gpus}", str(slurm_script())] + args[1:]
    raise ValueError(f"unknown launcher '{launcher}' (choose from deepspeed, torchrun, slurm)")


def launch(dry_run: bool = False, **kw) -> int:
    line = launcher_line(**kw)
    print(shlex.join(line), flush=True)
    if dry_run:
        return 0
    return subprocess.call(line, stdout=sys.stdout, stderr=sys.stderr)
