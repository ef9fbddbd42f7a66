"""`simcot sweep`: methods x latent budgets x seeds, as nested MLflow runs, with a table and plots.

The task is fixed and the latent budget L varies. S, the number of curriculum stages, is
``stages`` (default: the task's step count, ``data.steps`` for arith and ``data.digits`` for mult;
otherwise ``coconut.max_latent_stage``, e.g. 3 for GSM8K as in Coconut's recipe). Each cell:
- ``nocot``, ``cot``: once per seed (they have no latents; shown flat across L);
- ``coconut``, ``simcot-coconut``: from that seed's CoT run (the references' recipe), c = ceil(L / S)
  latents per step over min(L, S) stages of ``coconut.epochs_per_stage`` epochs, then the remaining
  epochs with every step replaced; evaluated with L' = c x min(L, S) latents (L itself whenever S
  divides L or L <= S);
- ``codi``, ``simcot-codi``: L latents from the start.
The references tune each method apart, so the sweep's YAML may hold, beside the shared config, a
``per_method`` mapping (method -> settings, nested or dotted) applied to that method's cells only;
command-line overrides apply to every cell and win over both.
The YAML may also fix its grid, ``grid: {methods: [...], latents: [...], seeds: [...]}`` (a
recipe's table then means one thing); ``--methods/--latents/--seeds`` on the command line win.
A finished cell (its summary in ``<out>/cells``) is not run again, so a killed sweep continues.
The sweep writes ``results.csv``, ``results.md`` (accuracy mean +- std per method and L) and
``accuracy_vs_latents.png`` / ``latent_cos_vs_latents.png`` to ``<out>``, and logs them on the
parent run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from simcot.train.config import Config, ConfigError, apply_dict, apply_overrides, read_yaml_mapping, validate
from simcot.train.methods import METHODS as REGISTRY
from simcot.train.methods import validate_method
from simcot.train.sweep_stats import bootstrap_interval, paired_gain

log = logging.getLogger(__name__)

# what each method is in a sweep, asked of the methods themselves
METHODS = tuple(m for m, cls in REGISTRY.items() if cls.sweepable)
LATENT_FREE = tuple(m for m in METHODS if not REGISTRY[m].uses_latents)
BASE_OF = {m: REGISTRY[m].base_method for m in METHODS if REGISTRY[m].base_method}  # a SIM-CoT gain's baseline


@dataclass(frozen=True)
class Cell:
    method: str
    latents: int  # 0 for the latent-free baselines
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-L{self.latents}-s{self.seed}"


def plan_cells(methods: list[str], latents: list[int], seeds: list[int]) -> list[Cell]:
    """Baselines first (the Coconut cells start from that seed's CoT run), then every latent cell."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown sweep method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if any(L < 1 for L in latents):
        raise ConfigError("sweep latent counts must be >= 1")
    starts = {REGISTRY[m].starts_from for m in methods}  # the runs some latent cells start from
    base = [m for m in LATENT_FREE if m in methods or m in starts]
    cells = [Cell(m, 0, s) for s in seeds for m in base]
    cells += [Cell(m, L, s) for s in seeds for L in latents for m in methods if m not in LATENT_FREE]
    return cells


@dataclass
class SweepConfig:
    """A sweep's YAML: the config shared by every cell, plus per-method settings."""

    shared: dict
    per_method: dict
    grid: dict = dataclasses.field(default_factory=dict)  # methods / latents / seeds lists, when the file fixes them

    @classmethod
    def load(cls, path: str) -> "SweepConfig":
        if not path:
            return cls({}, {})
        p = Path(path)
        data = read_yaml_mapping(p)
        grid = data.pop("grid", None) or {}
        if not isinstance(grid, dict) or set(grid) - {"methods", "latents", "seeds"} or not all(
                isinstance(v, list) for v in grid.values()):
            raise ConfigError(f"{p}: 'grid' must map methods / latents / seeds to lists")
        per_method = data.pop("per_method", None) or {}
        if not isinstance(per_method, dict):
            raise ConfigError(f"{p}: 'per_method' must map method names to settings")
        unknown = [m for m in per_method if m not in METHODS]
        if unknown:
            raise ConfigError(f"{p}: unknown method(s) in per_method: {', '.join(map(str, unknown))} "
                              f"(choose from {', '.join(METHODS)})")
        return cls(data, per_method, grid)

    def build(self, overrides: dict, method: str | None = None, cell: dict | None = None) -> Config:
        """File <- per_method[method] <- command-line overrides <- the cell's own settings, validated."""
        cfg = Config()
        apply_dict(cfg, self.shared)
        for key, value in (self.per_method.get(method) or {}).items():
            try:
                apply_overrides(cfg, {key: value})
            except ConfigError as e:
                raise ConfigError(f"per_method.{method}: {e}") from None
        apply_overrides(cfg, overrides)
        apply_overrides(cfg, cell or {})
        validate(cfg)
        validate_method(cfg)
        return cfg


def curriculum_stages(base: Config, stages: int = 0) -> int:
    """S: `stages` when given, else the generated task's step count, else coconut.max_latent_stage."""
    if stages > 0:
        return stages
    if base.data.source == "arith":
        return base.data.steps
    if base.data.source == "mult":
        return base.data.digits
    return max(base.coconut.max_latent_stage, 1)


def cell_overrides(cell: Cell, base: Config, out: Path, stages: int = 0) -> dict:
    steps = curriculum_stages(base, stages)
    ov = {"method": cell.method, "train.seed": cell.seed, "data.seed": base.data.seed,
          "train.out_dir": str(out / "runs"), "train.run_name": cell.name,
          "train.overwrite": True}  # a cell without its result file is rerun from scratch: its folder is the sweep's
    method = REGISTRY[cell.method]
    if method.uses_latents:
        ov.update(method.latent_budget(cell.latents, steps))
    if method.starts_from:
        ov["train.init_from"] = str(out / "runs" / Cell(method.starts_from, 0, cell.seed).name)
    return ov


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell_results(results: list[dict], method: str, L: int) -> list[dict]:
    return [r for r in results if r["method"] == method and (r["latents"] == L or method in LATENT_FREE)]


def summarize(results: list[dict], latents: list[int], split: str = "test") -> list[dict]:
    """Rows (method, L, n seeds, accuracy mean/std and its 95 % bootstrap interval over seeds, latent
    cosine mean; SIM-CoT rows add the paired per-seed gain over their base with its t interval)."""
    rows = []
    for m in METHODS:
        for L in latents:
            got = _cell_results(results, m, L)
            if not got:
                continue
            acc = [r["metrics"][f"{split}/accuracy"] for r in got]
            cos = [r["metrics"][f"{split}/latent_cos_within"] for r in got
                   if f"{split}/latent_cos_within" in r["metrics"]]
            mean, std = _mean_std(acc)
            lo, hi = bootstrap_interval(acc)
            row = {"method": m, "latents": L, "seeds": len(got), "accuracy_mean": mean, "accuracy_std": std,
                   "accuracy_ci_lo": lo, "accuracy_ci_hi": hi,
                   "latent_cos_within": statistics.fmean(cos) if cos else float("nan"),
                   "train_seconds": statistics.fmean(r["train_seconds"] for r in got),
                   "gain_over": "", "gain": float("nan"), "gain_ci_lo": float("nan"), "gain_ci_hi": float("nan"),
                   "gain_seeds": 0, "gain_significant": ""}
            if m in BASE_OF:
                seed_acc = lambda cell: {r["seed"]: r["metrics"][f"{split}/accuracy"] for r in cell}  # noqa: E731
                g = paired_gain(seed_acc(got), seed_acc(_cell_results(results, BASE_OF[m], L)))
                if g is not None:
                    row.update({"gain_over": BASE_OF[m], "gain": g["gain"], "gain_ci_lo": g["lo"],
                                "gain_ci_hi": g["hi"], "gain_seeds": g["seeds"],
                                "gain_significant": "yes" if g["significant"] else "no"})
            rows.append(row)
    return rows


def write_table(rows: list[dict], latents: list[int], out: Path) -> tuple[Path, Path]:
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["method"], r["latents"]): r for r in rows}
    methods = [m for m in METHODS if any(k[0] == m for k in by)]
    head = ["| method | " + " | ".join(f"L={L}" for L in latents) + " |", "|---|" + "---|" * len(latents)]
    seeds = sorted({r["seeds"] for r in rows})
    lines = [f"Test accuracy (%), mean over {'/'.join(map(str, seeds))} seeds [95 % bootstrap interval of the mean]:",
             ""] + head
    for m in methods:
        cells = []
        for L in latents:
            r = by.get((m, L))
            cells.append(f"{100 * r['accuracy_mean']:.1f} [{100 * r['accuracy_ci_lo']:.1f}, "
                         f"{100 * r['accuracy_ci_hi']:.1f}]" if r else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    gains = [r for r in rows if r["gain_over"]]
    if gains:
        lines += ["", "SIM-CoT's gain over its base (points), paired by seed, with a 95 % t interval; significant "
                  "when the interval excludes 0:", "",
                  "| method | over | L | seeds | gain | 95 % interval | significant |", "|---|---|---:|---:|---:|---|---|"]
        for r in gains:
            lines.append(f"| {r['method']} | {r['gain_over']} | {r['latents']} | {r['gain_seeds']} | "
                         f"{100 * r['gain']:+.1f} | [{100 * r['gain_ci_lo']:+.1f}, {100 * r['gain_ci_hi']:+.1f}] | "
                         f"{r['gain_significant']} |")
    lines += ["", "Mean pairwise cosine similarity of a sample's latents (collapse -> 1; undefined for one latent):",
              ""] + head
    for m in methods:
        if m in LATENT_FREE:
            continue
        cells = [f"{by[(m, L)]['latent_cos_within']:.2f}" if (m, L) in by and
                 not math.isnan(by[(m, L)]["latent_cos_within"]) else "" for L in latents]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot(rows: list[dict], latents: list[int], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}  # one colour per method in both plots
    paths = []
    for key, ylabel, fname in (("accuracy_mean", "test accuracy", "accuracy_vs_latents.png"),
                               ("latent_cos_within", "mean pairwise cosine of a sample's latents",
                                "latent_cos_vs_latents.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m in METHODS:
            pts = sorted((r["latents"], r[key], r["accuracy_std"]) for r in rows if r["method"] == m)
            pts = [p for p in pts if not math.isnan(p[1])]
            if not pts:
                continue
            xs, ys, err = zip(*pts)
            style = "--" if m in LATENT_FREE else "-"
            if key == "accuracy_mean":
                ax.errorbar(xs, ys, yerr=err, fmt=style + "o", capsize=3, label=m, color=colors[m])
            else:
                ax.plot(xs, ys, style + "o", label=m, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(latents, [str(L) for L in latents])
        if key == "accuracy_mean":
            ax.set_ylim(top=1.02)
        ax.set_xlabel("number of latent tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _open_parent(base: Config, config: str, out_dir: Path, methods: list[str], latents: list[int],
                 seeds: list[int]):
    """The sweep's parent run: reopened when this folder's sweep was started before (a continued
    or widened sweep keeps every child under one parent), else created. The grid is a set of tags,
    not params, because a continued sweep may widen it."""
    from simcot.train.tracking.tracker import run_exists, start_parent

    marker = out_dir / "parent_run.json"
    t = base.tracking
    old = json.loads(marker.read_text()) if marker.is_file() else {}
    run_id = old.get("run_id", "") if old.get("uri") == t.uri and run_exists(t.uri, old.get("run_id", ""),
                                                                             t.experiment) else ""
    parent = start_parent(t.experiment, out_dir.name, {"sweep.config": config or "(defaults)"}, uri=t.uri,
                          run_id=run_id)
    parent.set_tags({"sweep.methods": ",".join(methods), "sweep.latents": ",".join(map(str, latents)),
                     "sweep.seeds": ",".join(map(str, seeds))})
    marker.write_text(json.dumps({"run_id": parent.run_id, "uri": t.uri}))
    return parent


def run_sweep(config: str = "", methods: list[str] | None = None, latents: list[int] | None = None,
              seeds: list[int] | None = None, out: str = "sweep", overrides: dict | None = None,
              stages: int = 0) -> dict:
    from simcot.train.runner import run_training, setup_logging
    from simcot.train.tracking.tracker import NullTracker, tracked

    setup_logging()
    spec = SweepConfig.load(config)
    base = spec.build(overrides or {})
    methods = list(methods or spec.grid.get("methods") or METHODS)
    latents = sorted(latents or spec.grid.get("latents") or [1, 2, 4, 8, 16])
    seeds = list(seeds if seeds is not None else spec.grid.get("seeds", [0, 1, 2]))
    out_dir = Path(out)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    cells = plan_cells(methods, latents, seeds)
    parent = _open_parent(base, config, out_dir, methods, latents, seeds) if base.tracking.enabled else None
    t0 = time.perf_counter()
    results, cached = [], 0
    with tracked(parent if parent is not None else NullTracker()):  # the parent run ends as its sweep did
        for i, cell in enumerate(cells, 1):
            done = out_dir / "cells" / f"{cell.name}.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                cached += 1
                continue
            cfg = spec.build(overrides or {}, cell.method, cell_overrides(cell, base, out_dir, stages))
            if parent is not None:
                cfg.tracking.parent_run_id = parent.run_id
            log.info("sweep cell %d/%d: %s", i, len(cells), cell.name)
            summary = run_training(cfg)
            record = {"method": cell.method, "latents": cell.latents, "seed": cell.seed,
                      "train_seconds": summary["train_seconds"], "run_id": summary["run_id"],
                      "metrics": summary["metrics"]}
            done.write_text(json.dumps(record, indent=2))
            results.append(record)
        rows = summarize(results, latents)
        csv_path, md_path = write_table(rows, latents, out_dir)
        pngs = plot(rows, latents, out_dir)
        wall = time.perf_counter() - t0
        if parent is not None:
            for p in (csv_path, md_path, *pngs):
                parent.log_artifact(p, "sweep")
            ran = len(cells) - cached
            metrics = {"sweep/cells": float(len(cells)),
                       "sweep/cell_train_seconds": sum(r["train_seconds"] for r in results)}
            if ran:  # a re-run that only rebuilds the table keeps the wall time of the runs that trained
                metrics.update({"sweep/wall_seconds": wall, "sweep/cells_run": float(ran)})
            parent.log_metrics(metrics, 0)
    return {"out": str(out_dir), "cells": len(cells), "cells_cached": cached, "wall_seconds": wall,
            "table": str(md_path),
            "csv": str(csv_path), "plots": [str(p) for p in pngs], "parent_run_id": parent.run_id if parent else ""}
