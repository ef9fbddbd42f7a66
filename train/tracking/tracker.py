"""MLflow tracking: one run per training job, written by rank 0 only.

The default store is SQLite in the working directory (``sqlite:///<cwd>/mlruns.db``, artifacts
in ``./mlartifacts``), so nothing has to be started; ``tracking.uri`` or ``MLFLOW_TRACKING_URI``
selects any other store, including a remote ``mlflow server``.

Two runs may start at once on one store: a local SQLite store is created (MLflow's schema
migrations) under a file lock beside it, and a lost race to create the experiment is retried.
A resumed run does not log a metric point twice: steps it had logged before the crash are skipped
(the resumed run replays them bit-exactly, so the values are the same).

A sweep is a parent run (``start_parent``) whose ``run_id`` every child gets as
``tracking.parent_run_id``; MLflow nests the children under it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

_MAX_PARAM = 6000  # MLflow's limit on a param value
SWEEP_ROLE = {"simcot.role": "sweep"}  # marks a parent run; `simcot compare` leaves these out


def _experiment_of(client, run_id: str) -> str | None:
    """The experiment id of `run_id`, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.experiment_id
    except MlflowException:
        return None


def run_exists(uri: str, run_id: str, experiment: str) -> bool:
    """True when `run_id` is a run of `experiment` in the store at `uri`."""
    client = open_client(uri or default_uri())
    exp = client.get_experiment_by_name(experiment)
    return exp is not None and _experiment_of(client, run_id) == exp.experiment_id


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def store_lock(uri: str):
    """A lock held while a local SQLite store is opened: MLflow creates and migrates the schema on
    first use, and two processes doing that at once fail ("Online migration expected to match one
    row"). Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=600)


def open_client(uri: str):
    """An MlflowClient on `uri` whose store exists (created under :func:`store_lock`)."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the store is created (and migrated) on first access
    return client


class NullTracker:
    """Stands in on non-zero ranks and when tracking is disabled."""

    run_id = ""
    uri = ""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_jsonl(self, records: list[dict], name: str) -> None: ...
    def log_figure(self, figure, name: str) -> None: ...
    def log_run_plots(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str = "", parent_run_id: str = "",
                 tags: dict[str, str] | None = None):
        import mlflow

        self.uri = uri or default_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = open_client(self.uri)
        exp_id = self._experiment_id(experiment)
        self._logged: dict[str, int] = {}  # resumed run: the last step of each metric before the crash
        if run_id:  # resuming: keep writing into the same run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self._logged = self._last_steps()
        else:
            tags = {"mlflow.runName": run_name, **(tags or {})}
            if parent_run_id:
                self._check_parent(parent_run_id, exp_id, experiment)
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.experiment_id = exp_id

    def _experiment_id(self, experiment: str) -> str:
        from mlflow.exceptions import MlflowException

        for attempt in range(5):
            exp = self.client.get_experiment_by_name(experiment)
            if exp is not None:
                return exp.experiment_id
            kw = {}
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the local store
                db = Path(self.uri.split(":///", 1)[1])
                kw["artifact_location"] = (db.parent / "mlartifacts").as_uri()
            try:
                with store_lock(self.uri):
                    if self.client.get_experiment_by_name(experiment) is None:
                        return self.client.create_experiment(experiment, **kw)
            except MlflowException:  # another process created it first (a store without our lock)
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"could not create or find the MLflow experiment '{experiment}' at {self.uri}")

    def _last_steps(self) -> dict[str, int]:
        out = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                out[key] = max(m.step for m in history)
        return out

    def _check_parent(self, parent_run_id: str, exp_id: str, experiment: str) -> None:
        """A child must name an existing run of its own experiment, or the UI cannot nest it."""
        parent_exp = _experiment_of(self.client, parent_run_id)
        if parent_exp is None:
            raise ValueError(f"tracking.parent_run_id '{parent_run_id}': no such run at {self.uri}")
        if parent_exp != exp_id:
            raise ValueError(f"tracking.parent_run_id '{parent_run_id}' is in another experiment than "
                             f"'{experiment}'; give the child the parent's experiment")

    def log_params(self, params):
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._logged.get(k, -1)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text, name):
        self.client.log_text(self.run_id, text, name)

    def log_jsonl(self, records, name):
        """Records as one JSON object per line, e.g. decoded latents: ``log_jsonl(rows, "latents/test.jsonl")``."""
        folder, _, filename = name.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, filename)
            with open(path, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            self.client.log_artifact(self.run_id, path, folder or None)

    def log_figure(self, figure, name):
        self.client.log_figure(self.run_id, figure, name)

    def log_run_plots(self):
        """The run's loss curves (and accuracy vs number of latents) as PNG artifacts under plots/.

        Best effort: a plotting problem is logged and never fails a run that trained fine."""
        from simcot.train.tracking.plots import run_figures

        try:
            for name, fig in run_figures(self.client, self.run_id).items():
                self.log_figure(fig, name)
        except Exception as e:  # noqa: BLE001 - plots must not turn a finished run into a failed one
            log.warning("could not log the run's plots: %s: %s", type(e).__name__, e)

    def finish(self, status="FINISHED"):
        # against a server MLflow prints the run's URL to stdout; keep stdout for our output (JSON summaries)
        with contextlib.redirect_stdout(sys.stderr):
            self.client.set_terminated(self.run_id, status=status)


def end_failed(tracker: NullTracker, err: BaseException, plots: bool = False) -> None:
    """How a run that raised ends: KILLED on Ctrl-C or SIGTERM (the runner turns SIGTERM into a
    KeyboardInterrupt), else FAILED with the error as its ``simcot.error`` tag and, with `plots`,
    the curves up to the crash (they help to diagnose it)."""
    if isinstance(err, KeyboardInterrupt):
        tracker.finish("KILLED")
        return
    tracker.set_tags({"simcot.error": f"{type(err).__name__}: {err}"[:5000]})
    if plots:
        tracker.log_run_plots()
    tracker.finish("FAILED")


@contextlib.contextmanager
def tracked(tracker: NullTracker, on_error: Callable[[NullTracker, BaseException], None] = end_failed):
    """The end of a tracked run, owned once: FINISHED when the body completes; when it (or that
    finish) raises, ``on_error(tracker, err)`` records how it ended (default :func:`end_failed`)
    and the error propagates."""
    try:
        yield tracker
        tracker.finish("FINISHED")
    except BaseException as e:
        on_error(tracker, e)
        raise


def start_parent(experiment: str, name: str, params: dict | None = None, tags: dict | None = None,
                 uri: str = "", run_id: str = "") -> MlflowTracker:
    """A sweep's parent run. Pass its ``run_id`` to every child as ``tracking.parent_run_id`` (same
    experiment), log the sweep's own params/summary on it, and ``finish()`` it when the sweep ends.
    With ``run_id`` (a continued sweep) the existing parent is reopened instead."""
    parent = MlflowTracker(uri, experiment, name, run_id=run_id, tags={**SWEEP_ROLE, **(tags or {})})
    if params:
        parent.log_params(params)
    return parent


def make_tracker(tcfg, run_name: str, rank: int = 0, run_id: str = "") -> NullTracker:
    if rank != 0 or not tcfg.enabled:
        return NullTracker()
    return MlflowTracker(tcfg.uri, tcfg.experiment, run_name, run_id=run_id, parent_run_id=tcfg.parent_run_id)
