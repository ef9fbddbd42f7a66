"""What a training run records in MLflow (a real SQLite store): params, tags, metrics by step,
artifacts and plots; FAILED with the error on a crash, KILLED on Ctrl-C; sweeps as nested runs."""

import importlib.metadata as md
import json
import platform
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, fail_at, tiny_overrides
from simcot.train import loop as loop_mod
from simcot.train.config import TrackingConfig, config_from_dict, flatten, load_config, to_dict
from simcot.train.tracking.plots import run_figures
from simcot.train.runner import _tags, run_evaluation, run_training
from simcot.train.data.sources import content_hash, load_splits
from simcot.train.tracking.tracker import MlflowTracker, NullTracker, default_uri, make_tracker, start_parent

PNG = b"\x89PNG\r\n\x1a\n"


def _store(path: Path) -> str:
    return f"sqlite:///{path / 'mlruns.db'}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for this module (a new one costs ~1.5 s of migrations); tests use their own
    experiments in it."""
    return tmp_path_factory.mktemp("store")


def _tracked(store: Path, tmp: Path, experiment: str, **extra):
    ov = tiny_overrides(tmp, **{"tracking.enabled": True, "tracking.uri": _store(store),
                                "tracking.experiment": experiment, **extra})
    return load_config(None, ov), ov


def _only_run(store: Path, experiment: str):
    client = MlflowClient(_store(store))
    (run,) = client.search_runs(client.get_experiment_by_name(experiment).experiment_id)
    return client, run


def _artifact(client, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def _artifacts(client, run_id: str, folder: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, folder):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


@pytest.fixture(scope="module")
def tracked(store, tmp_path_factory):
    """One tiny run (8 steps, logged every step), shared by the checks below."""
    cfg, ov = _tracked(store, tmp_path_factory.mktemp("tracked"), "simcot")
    summary = run_training(cfg, ov)
    client = MlflowClient(_store(store))
    return SimpleNamespace(cfg=cfg, summary=summary, client=client, run=client.get_run(summary["run_id"]), store=store)


def test_params_hold_the_resolved_config_batch_data_versions_and_git(tracked):
    params, cfg = tracked.run.data.params, tracked.cfg
    for key, value in flatten(to_dict(cfg)).items():
        assert params[key] == str(value), key
    assert params["model.actual_vocab_size"] == "280" and params["model.parameters"].isdigit()
    assert params["world_size"] == "1" and params["global_batch_size"] == "16" and params["grad_accumulation"] == "2"
    splits = load_splits(cfg.data)
    for split in ("train", "val", "test"):
        assert params[f"data.{split}_rows"] == str(len(splits[split]))
        assert params[f"data.{split}_hash"] == content_hash(splits[split])
    assert params["data.source"] == "arith" and params["data.train_rows"] == "64"
    for pkg in ("torch", "transformers", "deepspeed", "triton"):
        assert params[f"version.{pkg}"] == md.version(pkg)
    assert params["version.python"] == platform.python_version()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert params["git.commit"] == head and params["git.dirty"] in ("True", "False")


def test_tags_name_the_run_and_point_to_the_final_checkpoint(tracked):
    tags = tracked.run.data.tags
    assert {k: tags[k] for k in ("method", "model", "dataset", "n_latents", "zero_stage", "hosts")} == {
        "method": "cot", "model": "tiny-llama", "dataset": "arith", "n_latents": "0", "zero_stage": "none",
        "hosts": "1"}
    ckpt = Path(tags["simcot.checkpoint"])
    assert ckpt == Path(tracked.summary["checkpoint"]).resolve() and ckpt.name == "step_0000008"
    assert (ckpt / "model.safetensors").is_file()
    assert tags["simcot.run_dir"] == str(Path(tracked.summary["run_dir"]).resolve()) and tags["simcot.host"]
    assert tracked.run.info.status == "FINISHED"


def test_tags_take_the_number_of_latents_from_the_method(tracked):
    from simcot.train.config import load_config
    from simcot.train.methods import METHODS

    coconut = load_config(None, {"method": "coconut", "coconut.c_thought": 2, "coconut.max_latent_stage": 2,
                                 "train.epochs": 6})
    assert _tags(coconut, METHODS["coconut"](coconut, None, None))["n_latents"] == "4"
    codi = load_config(None, {"method": "codi", "codi.n_latents": 5})
    assert _tags(codi, METHODS["codi"](codi, None, None))["n_latents"] == "5"
    assert _tags(tracked.cfg, METHODS["cot"](tracked.cfg, None, None))["n_latents"] == "0"


def test_metrics_by_step_match_the_run_folder(tracked):
    client, rid = tracked.client, tracked.run.info.run_id
    for key in ("train/loss", "train/ce", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
                "train/peak_memory_mb"):
        assert [m.step for m in client.get_metric_history(rid, key)] == list(range(1, 9)), key
    lines = [json.loads(l) for l in (Path(tracked.summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged = {m.step: m.value for m in client.get_metric_history(rid, "train/loss")}
    assert logged == {r["step"]: r["loss"] for r in lines}
    metrics = tracked.run.data.metrics
    assert metrics["test/accuracy"] == tracked.summary["test_accuracy"]
    assert metrics["val/samples_per_s"] > 0 and metrics["test/samples_per_s"] > 0 and metrics["train/seconds"] > 0


def test_artifacts_config_predictions_and_loss_plot(tracked, tmp_path):
    client, rid = tracked.client, tracked.run.info.run_id
    assert _artifacts(client, rid) == {"config.yaml", "predictions/predictions_val.jsonl",
                                       "predictions/predictions_test.jsonl", "plots/loss.png"}
    assert tracked.run.info.artifact_uri.startswith((tracked.store / "mlartifacts").as_uri())  # beside the store
    saved = yaml.safe_load(_artifact(client, rid, "config.yaml", tmp_path).read_text())
    assert config_from_dict(saved) == tracked.cfg
    preds = _artifact(client, rid, "predictions/predictions_test.jsonl", tmp_path).read_text().splitlines()
    assert len(preds) == 8 and {"gold", "prediction", "correct"} <= set(json.loads(preds[0]))
    png = _artifact(client, rid, "plots/loss.png", tmp_path).read_bytes()
    assert png.startswith(PNG) and len(png) > 5000


def test_a_crash_ends_the_run_failed_with_the_error(store, tmp_path, monkeypatch):
    cfg, ov = _tracked(store, tmp_path, "crash")
    fail_at(monkeypatch, 3, RuntimeError("boom at step 4"))
    with pytest.raises(RuntimeError, match="boom"):
        run_training(cfg, ov)
    client, run = _only_run(store, "crash")
    assert run.info.status == "FAILED"
    assert run.data.tags["simcot.error"] == "RuntimeError: boom at step 4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert "plots/loss.png" in _artifacts(client, run.info.run_id)  # the curves up to the crash


def test_ctrl_c_ends_the_run_killed(store, tmp_path, monkeypatch):
    cfg, ov = _tracked(store, tmp_path, "ctrl-c")
    fail_at(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, ov)
    _, run = _only_run(store, "ctrl-c")
    assert run.info.status == "KILLED" and "simcot.error" not in run.data.tags


def test_a_resumed_run_logs_each_metric_point_once(store, tmp_path, monkeypatch):
    """Steps 4-5 ran before the crash and again after resuming from the step-3 checkpoint: MLflow
    keeps one point per step (the replay is exact, so the first one stands)."""
    cfg, ov = _tracked(store, tmp_path, "resumed", **{"train.save_every": 3, "train.run_name": "r"})
    fail_at(monkeypatch, 5, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, ov)
    monkeypatch.undo()
    client, run = _only_run(store, "resumed")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5]
    cfg, ov = _tracked(store, tmp_path, "resumed", **{"train.save_every": 3, "train.run_name": "r",
                                                       "train.resume": str(tmp_path / "runs" / "r")})
    summary = run_training(cfg, ov)
    assert summary["run_id"] == run.info.run_id and summary["steps"] == 8
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_run_whose_other_rank_died_is_failed_naming_the_rank(store, tmp_path, monkeypatch):
    """Rank 1 leaves its error in the run folder before it exits; rank 0, stopped by the launcher's
    SIGTERM (a KeyboardInterrupt here), marks the run FAILED naming rank 1 instead of KILLED."""
    from simcot.train.runner import _record_failure

    cfg, ov = _tracked(store, tmp_path, "rank-died", **{"train.run_name": "rd"})
    real_step = loop_mod.Trainer.train_step

    def rank1_dies(self, state, order):
        if state.global_step == 2:
            _record_failure(self.run_dir, SimpleNamespace(is_main=False, rank=1), NullTracker(),
                            RuntimeError("injected failure"))
            raise KeyboardInterrupt
        return real_step(self, state, order)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", rank1_dies)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, ov)
    _, run = _only_run(store, "rank-died")
    assert run.info.status == "FAILED"
    assert run.data.tags["simcot.error"] == "rank 1 failed: RuntimeError: injected failure"
    assert run.data.tags["simcot.failed_rank"] == "1"


def test_eval_runs_end_failed_or_killed(tracked, monkeypatch):
    import simcot.train.evaluate as evaluate_mod

    def fail(*args, **kwargs):
        raise ValueError("decoder exploded")

    monkeypatch.setattr(evaluate_mod, "evaluate", fail)
    with pytest.raises(ValueError):
        run_evaluation(tracked.summary["run_dir"])
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(tracked.summary["run_dir"])
    exp = tracked.client.get_experiment_by_name("simcot").experiment_id
    evals = tracked.client.search_runs(exp, "tags.`simcot.eval_of` = '%s'" % tracked.run.info.run_id,
                                       order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in evals] == ["FAILED", "KILLED"]
    assert evals[0].data.tags["simcot.error"] == "ValueError: decoder exploded"


class _Recorder(NullTracker):
    """A tracker that remembers the tags it got and how it was finished."""

    def __init__(self):
        self.tags, self.calls = {}, []

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_run_plots(self):
        self.calls.append("plots")

    def finish(self, status="FINISHED"):
        self.calls.append(status)


def test_tracked_ends_a_run_finished_killed_or_failed_and_reraises():
    from simcot.train.tracking.tracker import end_failed
    from simcot.train.tracking.tracker import tracked as tracked_run

    done = _Recorder()
    with tracked_run(done):
        pass
    assert done.calls == ["FINISHED"] and done.tags == {}
    killed = _Recorder()
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(killed):
            raise KeyboardInterrupt
    assert killed.calls == ["KILLED"] and killed.tags == {}
    failed = _Recorder()
    with pytest.raises(ValueError, match="^bad$"):
        with tracked_run(failed):
            raise ValueError("bad")
    assert failed.calls == ["FAILED"] and failed.tags == {"simcot.error": "ValueError: bad"}
    plotted = _Recorder()  # training's rule: the curves up to the crash, then FAILED
    with pytest.raises(RuntimeError):
        with tracked_run(plotted, on_error=lambda tr, e: end_failed(tr, e, plots=True)):
            raise RuntimeError("x" * 6000)
    assert plotted.calls == ["plots", "FAILED"] and plotted.tags["simcot.error"] == "RuntimeError: " + "x" * 4986


def test_decoded_latents_as_jsonl_and_plots_of_latent_accuracy(store, tmp_path):
    tracker = MlflowTracker(_store(store), "latents", "r")
    for step, (loss, ce) in enumerate([(3.0, 2.5), (2.0, 1.5), (1.0, 0.8)], start=1):
        tracker.log_metrics({"train/loss": loss, "train/ce": ce}, step)
    tracker.log_metrics({f"test/latents_{k}/accuracy": acc for k, acc in [(0, 0.1), (2, 0.3), (4, 0.6)]}, 3)
    tracker.log_metrics({"val/latents_2/accuracy": 0.35}, 3)
    rows = [{"id": 0, "latents": ["7", "+", "2"]}, {"id": 1, "latents": ["ö"]}]
    tracker.log_jsonl(rows, "latents/test.jsonl")
    tracker.log_run_plots()
    client = tracker.client
    assert _artifacts(client, tracker.run_id) == {"latents/test.jsonl", "plots/loss.png",
                                                  "plots/accuracy_vs_latents.png"}
    text = _artifact(client, tracker.run_id, "latents/test.jsonl", tmp_path).read_text(encoding="utf-8")
    assert [json.loads(l) for l in text.splitlines()] == rows
    figs = run_figures(client, tracker.run_id)
    (loss_ax,) = figs["plots/loss.png"].axes
    assert [l.get_label() for l in loss_ax.lines] == ["train/loss", "train/ce"]
    assert list(loss_ax.lines[0].get_ydata()) == [3.0, 2.0, 1.0]
    (lat_ax,) = figs["plots/accuracy_vs_latents.png"].axes
    series = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in lat_ax.lines}
    assert series == {"val": ([2], [0.35]), "test": ([0, 2, 4], [0.1, 0.3, 0.6])}


def test_a_sweep_is_a_parent_run_with_nested_children(store):
    uri = _store(store)
    parent = start_parent("sweep", "lr-sweep", params={"sweep.grid": "train.lr=1e-3,3e-3"}, uri=uri)
    tcfg = TrackingConfig(enabled=True, uri=uri, experiment="sweep", parent_run_id=parent.run_id)
    child = make_tracker(tcfg, "lr-1e-3", rank=0)
    assert isinstance(make_tracker(tcfg, "lr-1e-3", rank=1), NullTracker)  # only rank 0 talks to MLflow
    assert type(make_tracker(TrackingConfig(enabled=False), "off")) is NullTracker
    child.finish()
    parent.finish()
    client = MlflowClient(uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    p = client.get_run(parent.run_id)
    assert p.data.tags["simcot.role"] == "sweep" and p.data.params == {"sweep.grid": "train.lr=1e-3,3e-3"}
    with pytest.raises(ValueError, match="is in another experiment than 'other'"):
        make_tracker(TrackingConfig(enabled=True, uri=uri, experiment="other", parent_run_id=parent.run_id), "x")
    with pytest.raises(ValueError, match=r"tracking.parent_run_id 'f+': no such run"):
        make_tracker(TrackingConfig(enabled=True, uri=uri, experiment="sweep", parent_run_id="f" * 32), "x")


def test_the_default_store_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert default_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = MlflowTracker("", "simcot", "here")
    tracker.log_text("x", "note.txt")
    tracker.finish()
    assert (tmp_path / "mlruns.db").is_file() and list((tmp_path / "mlartifacts").rglob("note.txt"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert default_uri() == "http://head:5000"


def test_a_plotting_problem_does_not_fail_the_run(store, monkeypatch, caplog):
    import simcot.train.tracking.plots as plots_mod

    def broken(client, run_id):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots_mod, "run_figures", broken)
    tracker = MlflowTracker(_store(store), "plots", "r")
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_run_plots()
    tracker.finish()
    assert "could not log the run's plots: RuntimeError: no fonts" in caplog.text
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"


SAME_SECOND = '''import time
_strftime = time.strftime
def _fixed(fmt, *args):  # every run name is stamped with the same second
    return "20260101-000000" if fmt == "%Y%m%d-%H%M%S" else _strftime(fmt, *args)
time.strftime = _fixed
'''


def test_two_trainings_started_in_the_same_second_keep_their_own_folders_and_runs(tmp_path):
    """Issue 15 (1, 3): default run names stamped to the same second, a fresh SQLite store that both
    processes create at once; both finish, each with its own folder, checkpoint and FINISHED run."""
    import os
    import sys

    from conftest import SHARED_DATA

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SAME_SECOND)
    uri = _store(tmp_path / "fresh")
    ov = tiny_overrides(tmp_path, **{"tracking.enabled": True, "tracking.uri": uri, "train.run_name": "",
                                     "data.n_train": 32, "train.epochs": 1, "data.n_val": 0, "data.n_test": 8})
    args = ["train"] + [f"--{k}={v}" for k, v in ov.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", SIMCOT_DATA_DIR=str(SHARED_DATA),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "simcot.launchers.cli", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    summaries = [json.loads(out) for out, _ in outs]
    dirs = {Path(s["run_dir"]) for s in summaries}
    assert len(dirs) == 2 and all("20260101-000000-" in d.name for d in dirs)
    for s in summaries:
        ckpt = Path(s["checkpoint"])
        assert ckpt.parent.parent == Path(s["run_dir"]) and (ckpt / "model.safetensors").is_file()
        assert len(Path(s["run_dir"], "metrics.jsonl").read_text().splitlines()) == 2  # 2 steps, not 4
    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("simcot").experiment_id])}
    assert set(runs) == {s["run_id"] for s in summaries}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert {r.data.tags["simcot.checkpoint"] for r in runs.values()} == {str(Path(s["checkpoint"]).resolve())
                                                                         for s in summaries}
