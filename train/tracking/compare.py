"""`simcot compare`: tracked runs side by side, from any MLflow store.

A table with one row per run: its identity (name, id, status, method, number of latents), the
params whose values differ between the chosen runs that have them, the final value of the headline metrics,
the best value of each over the run's history (and its step), wall time and training
throughput. ``--plot`` draws accuracy vs number of latents per method and the loss curves.

An experiment holds training runs and the runs of ``simcot eval`` / ``simcot decode`` on their
checkpoints; ``kind`` picks which are compared (training runs by default: an eval run's few params
would otherwise make every training param look "differing"). Eval runs show the training run they
evaluated (``eval_of``).
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from simcot.train.tracking import plots
from simcot.train.tracking.tracker import SWEEP_ROLE, default_uri

DEFAULT_EXPERIMENT = "simcot"  # TrackingConfig.experiment's default
DEFAULT_METRICS = ("val/accuracy",)
FORMATS = ("table", "markdown", "csv")
# Tag columns always shown: what a run *is* in this project.
IDENTITY_TAGS = ("method", "n_latents")
# Params never listed as "differing": shown elsewhere (run name) or redundant with a tag column.
SKIP_PARAMS = {"train.run_name", "method"}
KINDS = ("train", "eval", "decode", "all")


class CompareError(ValueError):
    """A problem with what was asked for (unknown experiment, no runs, unknown metric)."""


@dataclass
class Table:
    columns: list[str]
    rows: list[dict] = field(default_factory=list)


def _close(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------- selecting

def run_kind(run) -> str:
    """train | eval | decode | sweep. Runs without simcot's tags (logged by hand) count as training runs."""
    tags = run.data.tags
    role = tags.get("simcot.role")
    if role:
        return role
    if "simcot.eval_of" in tags:
        return "eval"
    if "simcot.checkpoint" in tags and "simcot.run_dir" not in tags:  # decode runs read a checkpoint
        return "decode"
    return "train"


def select_runs(client, experiment: str = "", run_ids: list[str] | None = None, filter_string: str = "",
                kind: str = "train") -> list:
    """The runs to compare, oldest first: those of `kind` (train, eval, decode or all). Sweep
    parents (containers without metrics) are left out unless named by id; runs named by id are
    taken whatever their kind."""
    if kind not in KINDS:
        raise CompareError(f"unknown kind '{kind}' (choose from {', '.join(KINDS)})")
    from mlflow.exceptions import MlflowException

    uri = client.tracking_uri
    if run_ids:
        if experiment or filter_string:
            raise CompareError("--runs cannot be combined with --experiment or --filter")
        runs = []
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except MlflowException:
                raise CompareError(f"run '{rid}' not found at {uri}") from None
        return runs
    if experiment or not filter_string:
        name = experiment or DEFAULT_EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise CompareError(f"experiment '{name}' not found at {uri} (experiments: {known})")
        exp_ids, where = [exp.experiment_id], f"in experiment '{name}'"
    else:
        exp_ids, where = [e.experiment_id for e in client.search_experiments()], f"at {uri}"
    try:
        runs = client.search_runs(exp_ids, filter_string, max_results=1000, order_by=["attributes.start_time ASC"])
    except MlflowException as e:
        raise CompareError(f'bad --filter "{filter_string}": {e.message}') from None
    role, value = next(iter(SWEEP_ROLE.items()))
    runs = [r for r in runs if r.data.tags.get(role) != value]
    if not runs:
        matching = f' match filter "{filter_string}"' if filter_string else ""
        raise CompareError(f"no runs {where}{matching}")
    chosen = [r for r in runs if kind == "all" or run_kind(r) == kind]
    if not chosen:
        kinds = sorted({run_kind(r) for r in runs})
        raise CompareError(f"no {kind} runs {where} (there are {', '.join(kinds)} runs: --kind "
                           f"{kinds[0] if len(kinds) == 1 else 'all'})")
    return chosen


# ------------------------------------------------------------------------------------ the table

class Histories:
    """Metric histories fetched once per (run, key)."""

    def __init__(self, client):
        self.client, self._cache = client, {}

    def __call__(self, run_id: str, key: str) -> plots.Curve:
        if (run_id, key) not in self._cache:
            self._cache[run_id, key] = plots.history(self.client, run_id, key)
        return self._cache[run_id, key]


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric


def _wall_seconds(run) -> float:
    end = run.info.end_time or int(time.time() * 1000)  # still running: so far
    return (end - run.info.start_time) / 1000


def build_table(client, runs: list, metrics: list[str] | None = None, params: list[str] | None = None,
                histories: Histories | None = None) -> Table:
    """Rows of `runs`. `metrics`: headline metrics, each shown as final and best value (an explicitly
    named metric that no run has is an error; defaults that no run has are left out). `params`:
    params to show even where they do not differ."""
    histories = histories or Histories(client)
    present = set().union(*(r.data.metrics for r in runs))
    if metrics:
        for m in metrics:
            if m not in present:
                raise CompareError(f"no run has metric '{m}'{_close(m, present)}")
    else:
        metrics = [m for m in DEFAULT_METRICS if m in present]
    params = list(params or [])
    all_params = set().union(*(r.data.params for r in runs))
    for p in params:
        if p not in all_params:
            raise CompareError(f"no run has param '{p}'{_close(p, all_params)}")
    tags = [t for t in IDENTITY_TAGS if any(t in r.data.tags for r in runs)]
    params = [p for p in params if p not in tags]  # `method` is a param and a tag: one column
    # among the runs that have the param: a param one run lacks (another kind of run) is no difference
    differing = sorted(k for k in all_params - SKIP_PARAMS - set(params)
                       if len({r.data.params[k] for r in runs if k in r.data.params}) > 1)
    names = {r.info.run_id: r.data.tags.get("mlflow.runName", r.info.run_name) for r in runs}
    joined = ["eval_of"] if any("simcot.eval_of" in r.data.tags for r in runs) else []

    finals = ["train/loss"] if "train/loss" in present and "train/loss" not in metrics else []
    columns = ["run", "run_id", "status", *joined, *tags, *params, *differing, *finals]
    for m in metrics:
        columns += [m, f"best {m}", f"best {m} step"]
    if "test/accuracy" in present and "test/accuracy" not in metrics:
        columns.append("test/accuracy")
    columns += ["wall_s", "tokens_per_s"]

    rows = []
    for r in runs:
        row = {"run": r.data.tags.get("mlflow.runName", r.info.run_name), "run_id": r.info.run_id,
               "status": r.info.status}
        if joined:  # the training run an eval run evaluated: its name when it is in the table, else its id
            of = r.data.tags.get("simcot.eval_of")
            row["eval_of"] = names.get(of, of[:8] if of else None)
        row.update({t: r.data.tags.get(t) for t in tags})
        row.update({p: r.data.params.get(p) for p in params + differing})
        row.update({k: r.data.metrics.get(k) for k in finals + ["test/accuracy"] if k in columns})
        for m in metrics:
            row[m] = r.data.metrics.get(m)
            curve = histories(r.info.run_id, m) if m in r.data.metrics else []
            if curve:
                pick = min if _lower_is_better(m) else max
                step, best = pick(curve, key=lambda sv: sv[1])
                row[f"best {m}"], row[f"best {m} step"] = best, step
        row["wall_s"] = _wall_seconds(r)
        tps = histories(r.info.run_id, "train/tokens_per_s") if "train/tokens_per_s" in r.data.metrics else []
        row["tokens_per_s"] = statistics.median(v for _, v in tps) if tps else None  # robust to a slow first step
        rows.append(row)
    return Table(columns, rows)


def sort_table(table: Table, key: str) -> None:
    """Sort by a column; `-column` sorts descending. Runs without a value go last either way."""
    descending = key.startswith("-")
    col = key[1:] if descending else key
    if col not in table.columns:
        raise CompareError(f"unknown sort column '{col}'{_close(col, table.columns)} "
                           f"(columns: {', '.join(table.columns)})")

    def value(row):
        v = row.get(col)
        if v is None:
            return None
        try:
            return (0, float(v))
        except (TypeError, ValueError):
            return (1, str(v))

    have = [r for r in table.rows if value(r) is not None]
    missing = [r for r in table.rows if value(r) is None]
    table.rows = sorted(have, key=value, reverse=descending) + missing


# ---------------------------------------------------------------------------------- rendering

def _cell(v, key: str = "") -> str:
    if v is None:
        return "-"
    if key == "run_id":  # the first 8 characters tell runs apart; csv keeps the full id
        return str(v)[:8]
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def render(table: Table, fmt: str = "table") -> str:
    if fmt not in FORMATS:
        raise CompareError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.columns)
        for row in table.rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in table.columns])
        return buf.getvalue()
    cells = [[_cell(row.get(c), key=c) for c in table.columns] for row in table.rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(table.columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(table.columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the plot

def latent_series(runs: list, split: str) -> dict[str, dict[int, float]]:
    """Accuracy by number of latents per method: a run contributes its `{split}/latents_{k}/accuracy`
    metrics and, at x = its `n_latents` tag, its final `{split}/accuracy`; runs of one method
    (e.g. seeds) are averaged per k."""
    groups: dict[str, list[dict[int, float]]] = {}
    for r in runs:
        points = {}
        acc, n = r.data.metrics.get(f"{split}/accuracy"), r.data.tags.get("n_latents", "")
        if acc is not None and n.isdigit():
            points[int(n)] = acc
        points.update(plots.latents_accuracy(r.data.metrics, split))
        if points:
            groups.setdefault(r.data.tags.get("method", "?"), []).append(points)
    labels = {m: f"{m} (mean of {len(runs)} runs)" if len(runs) > 1 else m for m, runs in groups.items()}
    return {labels[m]: points for m, points in plots.mean_by_key(groups).items()}


def figure(client, runs: list, split: str = "test", histories: Histories | None = None):
    """The comparison figure (returned unsaved, so tests can count its series)."""
    histories = histories or Histories(client)
    names = [r.data.tags.get("mlflow.runName", r.info.run_name) for r in runs]
    curves = {}
    for r, name in zip(runs, names):
        if "train/loss" in r.data.metrics:
            label = f"{name} ({r.info.run_id[:8]})" if names.count(name) > 1 else name
            curves[label] = histories(r.info.run_id, "train/loss")
    return plots.comparison_figure(curves, latent_series(runs, split), split)


# ------------------------------------------------------------------------------------- command

def compare(experiment: str = "", runs: list[str] | None = None, filter_string: str = "", tracking_uri: str = "",
            metrics: list[str] | None = None, params: list[str] | None = None, sort: str = "", fmt: str = "table",
            plot: str = "", split: str = "test", kind: str = "train") -> str:
    """What `simcot compare` prints; writes the plot to `plot` when given."""
    from mlflow.tracking import MlflowClient

    if fmt not in FORMATS:
        raise CompareError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    uri = tracking_uri or default_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():  # don't create an empty store
        raise CompareError(f"no MLflow store at {uri} (train a run here first, or give --tracking_uri or "
                           f"MLFLOW_TRACKING_URI)")
    client = MlflowClient(uri)
    chosen = select_runs(client, experiment, runs, filter_string, kind)
    histories = Histories(client)
    table = build_table(client, chosen, metrics, params, histories)
    if sort:
        sort_table(table, sort)
    if plot:
        figure(client, chosen, split, histories).savefig(plot, dpi=110)
    return render(table, fmt)
