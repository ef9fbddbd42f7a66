"""Land a sweep's cells as a results file: some cells (finished or still running), one row per
cell, or with ``--grid`` the whole grid's tables.

Some cells: for a figure that is due before its whole grid is: e.g. the toy grid's CoT-SFT
bases, which the sweep trains first, while its latent cells take hours more.

    python benchmarks/land_sweep_cells.py sweeps/sweep-toy --methods cot --name sweep_toy_cot_cpu \
        --commit COMMIT --command "simcot sweep --config launchers/recipes/sweep-toy.yaml ..." --title "..."

The grid: ``benchmarks/results/<name>/`` gets the sweep's own tables re-made from its cell files
(``train/sweep.py``: accuracy with 95 % intervals, paired SIM-CoT gains with their significance,
latent cosine) as ``results.{md,json,csv}``, the two plots, and ``cells.jsonl`` (every cell's
accuracy, training time and latent health):

    python benchmarks/land_sweep_cells.py sweeps/sweep-toy --grid --name sweep_toy_cpu --commit COMMIT \
        --command "simcot sweep --config launchers/recipes/sweep-toy.yaml ..." --title "..."

Each cell's accuracy and training time come from ``<sweep>/cells/<cell>.json`` (what the sweep
itself tabulates), its epoch count from the config saved with the run's last checkpoint.
``--commit`` is the commit the sweep ran (a sweep that ran on for hours is not the repository's
HEAD now); the machine fields are this process's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from results_io import RESULTS, machine_meta, write_results


def cell_rows(sweep: Path, methods: list[str]) -> list[dict]:
    rows = []
    for path in sorted((sweep / "cells").glob("*.json")):
        cell = json.loads(path.read_text())
        if cell["method"] not in methods:
            continue
        latest = sweep / "runs" / path.stem / "checkpoints" / "latest"
        ckpt = sweep / "runs" / path.stem / "checkpoints" / latest.read_text().strip() if latest.is_file() else None
        epochs = None
        if ckpt is not None and (ckpt / "config.yaml").is_file():
            epochs = yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["epochs"]
        rows.append({"cell": path.stem, "method": cell["method"], "latents": cell["latents"], "seed": cell["seed"],
                     "epochs": epochs, "test_accuracy": cell["metrics"]["test/accuracy"],
                     "train_seconds": cell["train_seconds"]})
    return sorted(rows, key=lambda r: (r["method"], r["latents"], r["seed"]))


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| method | L | seed | epochs | test accuracy (%) | train (s) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['latents']} | {r['seed']} | {r['epochs'] if r['epochs'] is not None else ''} | "
              f"{100 * r['test_accuracy']:.1f} | {r['train_seconds']:.0f} |" for r in rows]
    for method in sorted({r["method"] for r in rows}):
        acc = [100 * r["test_accuracy"] for r in rows if r["method"] == method]
        spread = f" +- {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        lines.append(f"| {method}: mean over {len(acc)} |  |  |  | {statistics.mean(acc):.1f}{spread} "
                     f"(min {min(acc):.1f}) |  |")
    return "\n".join(lines)


def land_grid(sweep: Path, out: Path, meta: dict, title: str) -> Path:
    """The whole grid of `sweep` as results files in `out` (see the module's doc); the JSON's path."""
    from simcot.train.sweep import plot, summarize, write_table

    cells = [json.loads(p.read_text()) | {"cell": p.stem} for p in sorted((sweep / "cells").glob("*.json"))]
    latents = sorted({c["latents"] for c in cells if c["latents"] > 0})
    rows = summarize(cells, latents)
    out.mkdir(parents=True, exist_ok=True)
    _, md = write_table(rows, latents, out)  # results.csv, and results.md (rewritten below with provenance)
    plot(rows, latents, out)
    per_cell = [{"cell": c["cell"], "method": c["method"], "latents": c["latents"], "seed": c["seed"],
                 "train_seconds": round(c["train_seconds"], 1),
                 **{k.split("/", 1)[1]: round(v, 4) for k, v in c["metrics"].items()
                    if k.startswith("test/") and "samples_per_s" not in k}} for c in cells]
    (out / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in per_cell))
    finite = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]  # NaN -> null
    return write_results("results", {"rows": finite, "cells": len(cells)}, (title + "\n\n" if title else "") +
                         md.read_text(), meta=meta, results_dir=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="the sweep's --out folder")
    ap.add_argument("--methods", default="", help="comma-separated methods whose cells to land (not with --grid)")
    ap.add_argument("--grid", action="store_true", help="land the whole grid into benchmarks/results/<name>/")
    ap.add_argument("--name", required=True, help="results name (benchmarks/results/<name>.{json,md}; "
                    "with --grid a folder)")
    ap.add_argument("--commit", required=True, help="the commit the sweep ran")
    ap.add_argument("--command", required=True, help="the sweep command, as run")
    ap.add_argument("--threads", type=int, default=1, help="the sweep's --train.threads")
    ap.add_argument("--title", default="", help="a sentence above the table")
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    args = ap.parse_args()
    meta = machine_meta("cpu", command=args.command)
    meta.update(commit=args.commit, dirty=False, threads=args.threads)  # the sweep's, not this process's
    if args.grid:
        if not list(Path(args.sweep, "cells").glob("*.json")):
            raise SystemExit(f"land_sweep_cells: no cells in {args.sweep}/cells")
        path = land_grid(Path(args.sweep), Path(args.results_dir or RESULTS) / args.name, meta, args.title)
        print(f"wrote {path} and the tables, plots and cells.jsonl beside it")
        return
    if not args.methods:
        raise SystemExit("land_sweep_cells: --methods is required (or --grid)")
    rows = cell_rows(Path(args.sweep), [m.strip() for m in args.methods.split(",") if m.strip()])
    if not rows:
        raise SystemExit(f"land_sweep_cells: no cells of {args.methods} in {args.sweep}/cells")
    path = write_results(args.name, {"cells": rows}, markdown(rows, args.title), meta=meta,
                         results_dir=args.results_dir)
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
