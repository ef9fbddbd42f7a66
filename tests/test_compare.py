"""`simcot compare`: the table, the plot and the error messages from a store with known runs,
and two real training runs compared through a real `mlflow server`."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from conftest import tiny_overrides
from simcot.launchers import cli
from simcot.train.tracking import compare as cmp
from simcot.train.config import load_config
from simcot.train.runner import run_training
from simcot.train.tracking.tracker import start_parent

T0 = 1_800_000_000_000  # ms; fixed start times give exact wall times


def _run(client, exp_id, name, start_s, wall_s, params, tags, metrics):
    """A finished run with `metrics` = {key: [(step, value), ...]}."""
    run = client.create_run(exp_id, start_time=T0 + start_s * 1000, run_name=name,
                            tags={"mlflow.runName": name, **tags})
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, T0, s) for k, curve in metrics.items() for s, v in curve])
    client.set_terminated(rid, "FINISHED", end_time=T0 + (start_s + wall_s) * 1000)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three known runs in experiment 'cmp' (plus a sweep parent that compare leaves out) and an
    empty experiment."""
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(root / "mlartifacts").as_uri())
    client.create_experiment("empty")
    base = {"train.seed": 0, "data.source": "arith", "train.batch_size": 64}
    ids = SimpleNamespace()
    ids.a = _run(client, exp, "cot-a", 0, 30, {**base, "method": "cot", "train.lr": 0.001, "train.run_name": "cot-a"},
                 {"method": "cot", "n_latents": "0"},
                 {"train/loss": [(1, 3.0), (2, 2.0), (3, 1.0)], "val/accuracy": [(1, 0.6), (3, 0.5)],
                  "test/accuracy": [(3, 0.4)], "train/tokens_per_s": [(1, 100.0), (2, 300.0), (3, 200.0)]})
    ids.b = _run(client, exp, "coconut-b", 10, 12.5,
                 {**base, "method": "coconut", "train.lr": 0.003, "train.run_name": "coconut-b"},
                 {"method": "coconut", "n_latents": "2"},
                 {"train/loss": [(1, 4.0), (2, 3.0)], "val/accuracy": [(2, 0.7)], "test/accuracy": [(2, 0.3)],
                  "test/latents_0/accuracy": [(2, 0.1)], "test/latents_1/accuracy": [(2, 0.2)],
                  "test/latents_2/accuracy": [(2, 0.3)], "train/tokens_per_s": [(2, 1500.0)]})
    ids.c = _run(client, exp, "coconut-c", 20, 2,
                 {**base, "method": "coconut", "train.lr": 0.003, "train.seed": 1, "train.run_name": "coconut-c"},
                 {"method": "coconut", "n_latents": "2"},
                 {"train/loss": [(1, 5.0), (2, 2.0)], "test/accuracy": [(2, 0.5)],
                  "test/latents_0/accuracy": [(2, 0.2)], "test/latents_1/accuracy": [(2, 0.4)],
                  "test/latents_2/accuracy": [(2, 0.5)]})
    parent = client.create_run(exp, run_name="sweep", tags={"simcot.role": "sweep"}).info.run_id
    client.set_terminated(parent)
    return SimpleNamespace(uri=uri, client=client, ids=ids)


def _table(store, **kw):
    client = store.client
    return cmp.build_table(client, cmp.select_runs(client, "cmp"), **kw)


def test_table_shows_differing_params_final_and_best_metrics_wall_time_and_speed(store):
    i = store.ids
    expected = f"""\
| run | run_id | status | method | n_latents | train.lr | train.seed | train/loss | val/accuracy | best val/accuracy | best val/accuracy step | test/accuracy | wall_s | tokens_per_s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| cot-a | {i.a[:8]} | FINISHED | cot | 0 | 0.001 | 0 | 1 | 0.5 | 0.6 | 1 | 0.4 | 30 | 200 |
| coconut-b | {i.b[:8]} | FINISHED | coconut | 2 | 0.003 | 0 | 3 | 0.7 | 0.7 | 2 | 0.3 | 12.5 | 1500 |
| coconut-c | {i.c[:8]} | FINISHED | coconut | 2 | 0.003 | 1 | 2 | - | - | - | 0.5 | 2 | - |
"""  # noqa: E501
    assert cmp.render(_table(store), "markdown") == expected
    csv_lines = cmp.render(_table(store), "csv").splitlines()
    assert csv_lines[1] == f"cot-a,{i.a},FINISHED,cot,0,0.001,0,1.0,0.5,0.6,1,0.4,30.0,200.0"
    text = cmp.render(_table(store), "table").splitlines()
    assert text[0].split() == ["run", "run_id", "status", "method", "n_latents", "train.lr", "train.seed", "train/loss",
                               "val/accuracy", "best", "val/accuracy", "best", "val/accuracy", "step", "test/accuracy",
                               "wall_s", "tokens_per_s"]
    assert text[4].split()[:3] == ["coconut-c", i.c[:8], "FINISHED"] and len({len(l) for l in text[:2]}) == 1


def test_metrics_params_and_sorting(store):
    t = _table(store, metrics=["test/accuracy", "train/loss"], params=["method", "data.source"])
    assert t.columns[5:9] == ["data.source", "train.lr", "train.seed", "test/accuracy"]
    assert t.columns.count("train/loss") == 1 and t.columns.count("method") == 1
    a = t.rows[0]
    assert (a["best test/accuracy"], a["best train/loss"], a["best train/loss step"]) == (0.4, 1.0, 3)  # loss: min
    cmp.sort_table(t, "-test/accuracy")
    assert [r["run"] for r in t.rows] == ["coconut-c", "cot-a", "coconut-b"]
    t = _table(store)
    cmp.sort_table(t, "-best val/accuracy")  # coconut-c has no val/accuracy: last either way
    assert [r["run"] for r in t.rows] == ["coconut-b", "cot-a", "coconut-c"]
    cmp.sort_table(t, "best val/accuracy")
    assert [r["run"] for r in t.rows] == ["cot-a", "coconut-b", "coconut-c"]
    cmp.sort_table(t, "run")
    assert [r["run"] for r in t.rows] == ["coconut-b", "coconut-c", "cot-a"]
    with pytest.raises(cmp.CompareError, match=r"^unknown sort column 'wal_s' \(did you mean 'wall_s'\?\)"):
        cmp.sort_table(t, "wal_s")


def test_selecting_by_runs_and_by_filter(store):
    client, i = store.client, store.ids
    assert [r.info.run_id for r in cmp.select_runs(client, run_ids=[i.c, i.a])] == [i.c, i.a]
    coconut = cmp.select_runs(client, filter_string="tags.method = 'coconut'")  # every experiment
    assert [r.info.run_id for r in coconut] == [i.b, i.c]
    lr = cmp.select_runs(client, "cmp", filter_string="params.`train.lr` = '0.001'")
    assert [r.info.run_id for r in lr] == [i.a]


def test_plot_has_one_series_per_method_and_one_loss_curve_per_run(store, tmp_path, capsys):
    runs = cmp.select_runs(store.client, "cmp")
    fig = cmp.figure(store.client, runs, "test")
    latents, losses = fig.axes
    series = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in latents.lines}
    assert series.keys() == {"cot", "coconut (mean of 2 runs)"}
    assert series["cot"] == ([0], [0.4])
    coconut = series["coconut (mean of 2 runs)"]
    assert coconut[0] == [0, 1, 2] and coconut[1] == pytest.approx([0.15, 0.3, 0.4])  # b and c, per k
    assert [l.get_label() for l in losses.lines] == ["cot-a", "coconut-b", "coconut-c"]
    assert list(losses.lines[0].get_ydata()) == [3.0, 2.0, 1.0]

    png = tmp_path / "cmp.png"
    # through the command line, which also prints the table
    cli.main(["compare", "--experiment", "cmp", "--tracking_uri", store.uri, "--plot", str(png), "--format", "csv"])
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("run,run_id,status,") and len(out.out.splitlines()) == 4
    assert out.err.strip() == f"wrote {png}"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


def test_help(capsys):
    cli.main(["--help"])
    assert "  compare   tracked runs side by side" in capsys.readouterr().out
    cli.main(["compare", "--help"])
    assert capsys.readouterr().out.strip() == cli.command_help(cli.CompareOptions).strip()


def _error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", *args])
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_error_messages(store, capsys, tmp_path, monkeypatch):
    u = store.uri
    assert _error(capsys, "--experiment", "nope", "--tracking_uri", u) == (
        f"simcot: error: experiment 'nope' not found at {u} (experiments: Default, cmp, empty)")
    assert _error(capsys, "--experiment", "empty", "--tracking_uri", u) == (
        "simcot: error: no runs in experiment 'empty'")
    assert _error(capsys, "--experiment", "cmp", "--filter", "tags.method = 'x'", "--tracking_uri", u) == (
        "simcot: error: no runs in experiment 'cmp' match filter \"tags.method = 'x'\"")
    assert _error(capsys, "--experiment", "cmp", "--metric", "val/acc", "--tracking_uri", u) == (
        "simcot: error: no run has metric 'val/acc' (did you mean 'val/accuracy'?)")
    assert _error(capsys, "--experiment", "cmp", "--metric", "zzz", "--tracking_uri", u) == (
        "simcot: error: no run has metric 'zzz'")
    assert _error(capsys, "--runs", "0" * 31 + "a", "--tracking_uri", u) == (
        f"simcot: error: run '{'0' * 31}a' not found at {u}")
    assert _error(capsys, "--experiment", "cmp", "--format", "html", "--tracking_uri", u) == (
        "simcot: error: unknown format 'html' (choose from table, markdown, csv)")
    assert _error(capsys, "--experiment", "cmp", "--params", "train.lrr", "--tracking_uri", u) == (
        "simcot: error: no run has param 'train.lrr' (did you mean 'train.lr'?)")
    assert _error(capsys, "--tracking_uri", u) == (  # the default experiment is the one `simcot train` uses
        f"simcot: error: experiment 'simcot' not found at {u} (experiments: Default, cmp, empty)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # the default store, ./mlruns.db, is not there
    missing = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert _error(capsys) == (
        f"simcot: error: no MLflow store at {missing} (train a run here first, or give --tracking_uri or "
        "MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "mlruns.db").exists()
    assert _error(capsys, "--sort", "-wall_s", "--tracking_uri", u) == (
        "simcot: error: --sort needs a value (one that starts with '-' is written --sort=-VALUE)")


# ------------------------------------------------------------------------------ a real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, start_timeout: float = 90):
    """`mlflow server` on a free loopback port with a temp SQLite backend and artifact root; stopped
    (its whole process group) however the test ends."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
           f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up after {start_timeout}s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the server's own group: it and its uvicorn worker
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_two_runs_through_a_tracking_server_compared_from_the_command_line(tmp_path, capsys):
    with mlflow_server(tmp_path) as url:
        parent = start_parent("sweep", "lr-sweep", params={"sweep.param": "train.lr"}, uri=url)
        for lr in ("0.001", "0.003"):
            ov = tiny_overrides(tmp_path, **{
                "tracking.enabled": True, "tracking.uri": url, "tracking.experiment": "sweep",
                "tracking.parent_run_id": parent.run_id, "train.run_name": f"lr-{lr}", "train.lr": lr,
                "train.epochs": 1, "data.n_val": 0})
            run_training(load_config(None, ov), ov)
        parent.finish()
        out = capsys.readouterr()
        assert "View run lr-0.001" in out.err and "View run" not in out.out  # stdout stays for JSON summaries

        env = dict(os.environ, MLFLOW_TRACKING_URI=url)  # the store from the environment, as on a cluster
        p = subprocess.run([str(Path(sys.executable).with_name("simcot")), "compare", "--experiment", "sweep"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        header, rule, *rows = p.stdout.splitlines()
        assert header.split()[:6] == ["run", "run_id", "status", "method", "n_latents", "train.lr"]
        assert [r.split()[0] for r in rows] == ["lr-0.001", "lr-0.003"]  # the sweep parent is left out
        assert [r.split()[5] for r in rows] == ["0.001", "0.003"]

        client = MlflowClient(url)
        children = cmp.select_runs(client, filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
        assert len(children) == 2
        arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
        assert {"config.yaml", "plots", "predictions"} <= arts  # uploaded through the server


def test_training_runs_by_default_and_differing_among_runs_that_have_the_param(store):
    """Issue 15 (10): eval/decode runs (a few eval./data. params each) made every training param a
    "differing" column. Compare training runs by default, eval runs on their own joined to their
    training run, and decide "differing" among the runs that have the param."""
    client = store.client
    exp = client.create_experiment("mixed")
    full = {f"model.p{i}": i for i in range(30)}  # what a training run logs, the same in both
    a = _run(client, exp, "cot-a", 0, 10, {**full, "train.lr": 0.001, "eval.split": "test"},
             {"method": "cot", "simcot.run_dir": "/runs/a", "simcot.role": "train"}, {"test/accuracy": [(4, 0.5)]})
    b = _run(client, exp, "cot-b", 1, 10, {**full, "train.lr": 0.003, "eval.split": "test"},
             {"method": "cot", "simcot.run_dir": "/runs/b"}, {"test/accuracy": [(4, 0.6)]})  # before simcot.role
    ev = _run(client, exp, "eval-cot-a-val", 2, 1, {"eval.split": "val", "data.source": "arith"},
              {"method": "cot", "simcot.eval_of": a, "simcot.checkpoint": "/runs/a/checkpoints/step_4"},
              {"val/accuracy": [(4, 0.7)]})
    dec = _run(client, exp, "decode-cot-a", 3, 1, {}, {"method": "cot", "simcot.checkpoint": "/runs/a/c"}, {})
    table = cmp.build_table(client, cmp.select_runs(client, "mixed"))
    assert [r["run_id"] for r in table.rows] == [a, b]
    assert [c for c in table.columns if c.startswith(("model.", "train.", "eval.", "data."))] == ["train.lr"]
    assert [cmp.run_kind(client.get_run(r)) for r in (a, b, ev, dec)] == ["train", "train", "eval", "decode"]

    evals = cmp.build_table(client, cmp.select_runs(client, "mixed", kind="eval"))
    assert [(r["run"], r["eval_of"]) for r in evals.rows] == [("eval-cot-a-val", a[:8])]
    everything = cmp.build_table(client, cmp.select_runs(client, "mixed", kind="all"))
    assert [r["run_id"] for r in everything.rows] == [a, b, ev, dec]
    assert everything.rows[2]["eval_of"] == "cot-a"  # joined by name when its training run is in the table
    assert [c for c in everything.columns if c.startswith(("model.", "train.", "eval.", "data."))] == \
        ["eval.split", "train.lr"]  # eval.split differs (test vs val); data.source is in one run only
    with pytest.raises(cmp.CompareError, match=r"^unknown kind 'evals' \(choose from train, eval, decode, all\)$"):
        cmp.select_runs(client, "mixed", kind="evals")
    only_eval = client.create_experiment("only-eval")
    _run(client, only_eval, "eval-x", 0, 1, {}, {"simcot.eval_of": a}, {})
    with pytest.raises(cmp.CompareError, match=r"no train runs in experiment 'only-eval' \(there are eval runs: "
                                               r"--kind eval\)"):
        cmp.select_runs(client, "only-eval")
