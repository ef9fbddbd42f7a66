"""One way to write a results file, so every figure in the READMEs can say where it came from.

``write_results(name, data, markdown)`` writes ``benchmarks/results/<name>.json`` (``data`` plus a
``meta`` block: command, commit, dirty tree, date, machine, cores, load average, torch threads,
versions) and ``<name>.md`` (the rendered table, headed by one provenance line). The READMEs embed
each ``.md`` between ``<!-- results:<name> -->`` and ``<!-- /results:<name> -->``; ``render_readme.py``
rewrites those blocks and ``--check`` fails when a README disagrees with its results files.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from render_readme import READMES

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "SIMCOT_RESULTS_DIR"  # a folder that takes every results file instead (gpu_checks.sh: its archive)
REPO = Path(__file__).resolve().parents[1]


# What measuring itself writes: the results files and the READMEs that render_readme.py renders from
# them. A change there is not a change of the code measured (`make measure`'s later rows find the
# earlier rows' files written, and were all marked dirty).
MEASURE_OUTPUTS = tuple(str(path.relative_to(REPO)) for path in (RESULTS, *READMES))


def _git(*args: str) -> str:
    try:
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def tree_dirty() -> bool:
    """Tracked files differ from the commit, outside MEASURE_OUTPUTS (False outside a git checkout)."""
    excluded = [f":(exclude){path}" for path in MEASURE_OUTPUTS]
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded))


def machine_meta(device: str = "cpu", command: str | None = None) -> dict:
    """Where and when a figure was measured: enough to tell a stale figure from a current one."""
    import torch

    meta = {
        "command": command or "python " + " ".join(shlex.quote(a) for a in
                                                   [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": tree_dirty(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def provenance(meta: dict) -> str:
    """The one line above every rendered table."""
    where = meta.get("gpu") or f"{meta['cores']}-core {meta['machine']} CPU"
    dirty = "+dirty" if meta.get("dirty") else ""
    return (f"Measured {meta['date']} at commit `{meta['commit'][:10]}{dirty}` on {where}, {meta['threads']} torch "
            f"threads, load {meta['load_avg_1m']}, torch {meta['torch']}: `{meta['command']}`")


def write_results(name: str, data: dict, markdown: str, device: str = "cpu", meta: dict | None = None,
                  results_dir: Path | None = None) -> Path:
    """Write <name>.json and <name>.md into `results_dir`, else $SIMCOT_RESULTS_DIR, else
    benchmarks/results; returns the JSON path. ``meta`` defaults to this process's."""
    out = Path(results_dir or os.environ.get(RESULTS_ENV) or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or machine_meta(device)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, **data}, indent=1) + "\n")
    (out / f"{name}.md").write_text(provenance(meta) + "\n\n" + markdown.strip() + "\n")
    return path
