"""`simcot sweep`: the grid runs as nested MLflow runs, writes its table and plots, and resumes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import SHARED_DATA, tiny_overrides
from simcot.train.config import load_config
import pytest

from simcot.train.config import ConfigError
from simcot.train.sweep import Cell, SweepConfig, cell_overrides, curriculum_stages, plan_cells

SIMCOT = str(Path(sys.executable).with_name("simcot"))


def test_cells_put_baselines_first_and_scale_coconut_to_the_budget(tmp_path):
    cells = plan_cells(["coconut", "codi"], [1, 8], [0, 1])
    assert [c.name for c in cells[:2]] == ["cot-L0-s0", "cot-L0-s1"]  # Coconut starts from CoT
    assert len(cells) == 2 + 2 * 2 * 2
    base = load_config(None, {"data.steps": 4})
    ov = cell_overrides(Cell("coconut", 8, 1), base, tmp_path)
    assert (ov["coconut.c_thought"], ov["coconut.max_latent_stage"]) == (2, 4)  # 2 latents per step, 4 steps
    assert ov["train.init_from"].endswith("cot-L0-s1")
    assert ov["train.overwrite"] is True  # an interrupted cell reruns in its own folder (run folders are exclusive)
    assert cell_overrides(Cell("simcot-codi", 16, 0), base, tmp_path)["codi.n_latents"] == 16


def test_curriculum_stages_follow_the_task_unless_given(tmp_path):
    assert curriculum_stages(load_config(None, {"data.source": "mult", "data.digits": 5})) == 5
    gsm = load_config(None, {"data.source": "gsm8k", "coconut.max_latent_stage": 3, "coconut.epochs_per_stage": 3})
    assert curriculum_stages(gsm) == 3  # GSM8K has no fixed step count: Coconut's own stage count
    ov = cell_overrides(Cell("coconut", 10, 0), gsm, tmp_path, stages=5)  # SIM-CoT's GPT-2 recipe: 5 x 2
    assert (ov["coconut.c_thought"], ov["coconut.max_latent_stage"]) == (2, 5)
    assert "coconut.epochs_per_stage" not in ov  # the base config's epochs per stage stand


def test_quick_sweep_writes_table_plots_and_nested_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ov = tiny_overrides(tmp_path, **{"tracking.enabled": True, "tracking.uri": uri, "tracking.experiment": "sw",
                                     "data.steps": 2, "train.epochs": 2, "eval.max_new_tokens": 16})
    ov = {k: v for k, v in ov.items() if not k.startswith("train.run_name") and k != "train.out_dir"}
    args = ["sweep", "--quick", "--out", str(tmp_path / "sw")] + [f"--{k}={v}" for k, v in ov.items()]
    env = dict(os.environ, SIMCOT_DATA_DIR=str(SHARED_DATA))
    p = subprocess.run([SIMCOT, *args], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    out = tmp_path / "sw"
    rows = list(csv.DictReader((out / "results.csv").open()))
    got = {(r["method"], int(r["latents"])) for r in rows}
    methods = ("nocot", "cot", "coconut", "simcot-coconut", "codi", "simcot-codi")
    assert got == {(m, L) for m in methods for L in (1, 4)}
    table = (out / "results.md").read_text()
    first, second = table.split("Mean pairwise cosine")
    assert first.startswith("Test accuracy (%)") and "| method | L=1 | L=4 |" in first
    assert [l.split(" |")[0] for l in first.splitlines() if l.startswith("| ") and "method" not in l] == \
        [f"| {m}" for m in methods]
    assert [l.split(" |")[0] for l in second.splitlines() if l.startswith("| ") and "method" not in l] == \
        [f"| {m}" for m in methods if m not in ("nocot", "cot")]
    for png in ("accuracy_vs_latents.png", "latent_cos_vs_latents.png"):
        assert (out / png).stat().st_size > 5000
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sw")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 + 4 * 2
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "sweep")} >= {"sweep/results.md",
                                                                                        "sweep/results.csv"}
    # a second invocation finds every cell done and only rebuilds the table
    cells = {f.name: f.stat().st_mtime for f in (out / "cells").iterdir()}
    p = subprocess.run([SIMCOT, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0 and {f.name: f.stat().st_mtime for f in (out / "cells").iterdir()} == cells
    runs = client.search_runs([exp.experiment_id])  # the continued sweep reopened its parent
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parents[0].info.run_id]
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    assert json.loads((out / "cells" / "codi-L4-s0.json").read_text())["metrics"]["test/accuracy"] >= 0


def test_per_method_settings_reach_only_their_method(tmp_path):
    f = tmp_path / "sw.yaml"
    f.write_text("train: {lr: 0.0001, epochs: 3}\nper_method:\n  codi: {train.lr: 0.003, codi: {distill_weight: 20}}\n")
    spec = SweepConfig.load(str(f))
    codi = spec.build({"train.epochs": 5}, "codi", {"codi.n_latents": 8})
    cot = spec.build({"train.epochs": 5}, "cot")
    assert (codi.train.lr, codi.codi.distill_weight, codi.codi.n_latents, codi.train.epochs) == (0.003, 20.0, 8, 5)
    assert (cot.train.lr, cot.codi.distill_weight, cot.train.epochs) == (0.0001, 1.0, 5)
    f.write_text("per_method:\n  codi: {train.lrr: 0.003}\n")
    with pytest.raises(ConfigError, match=r"^per_method.codi: unknown config key 'train.lrr' \(did you mean 'lr'\?\)$"):
        SweepConfig.load(str(f)).build({}, "codi")
    f.write_text("per_method:\n  icot: {train.lr: 0.003}\n")
    with pytest.raises(ConfigError, match="unknown method\\(s\\) in per_method: icot"):
        SweepConfig.load(str(f))


def test_the_yaml_grid_is_the_default_and_flags_win(tmp_path, monkeypatch):
    import simcot.train.runner as runner
    from simcot.train.sweep import run_sweep

    ran = []

    def fake_training(cfg):
        ran.append((cfg.method, cfg.codi.n_latents if cfg.method == "codi" else 0, cfg.train.seed))
        return {"train_seconds": 0.0, "run_id": "", "metrics": {"test/accuracy": 0.5}}

    monkeypatch.setattr(runner, "run_training", fake_training)
    f = tmp_path / "sw.yaml"
    f.write_text("tracking: {enabled: false}\ngrid: {methods: [codi], latents: [2, 8], seeds: [0, 1, 2, 3, 4]}\n")
    run_sweep(str(f), out=str(tmp_path / "a"))
    assert sorted(ran) == sorted(("codi", L, s) for L in (2, 8) for s in range(5))
    ran.clear()
    run_sweep(str(f), latents=[4], seeds=[7], out=str(tmp_path / "b"))
    assert ran == [("codi", 4, 7)]
    f.write_text("grid: {latents: 4}\n")
    with pytest.raises(ConfigError, match="'grid' must map methods / latents / seeds to lists"):
        SweepConfig.load(str(f))


@pytest.mark.parametrize("err, status", [(RuntimeError("cell exploded"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_sweep_that_stops_ends_its_parent_run_failed_or_killed(tmp_path, monkeypatch, err, status):
    import simcot.train.runner as runner
    from simcot.train.sweep import run_sweep

    def fake_training(cfg):
        raise err

    monkeypatch.setattr(runner, "run_training", fake_training)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    f = tmp_path / "sw.yaml"
    f.write_text(f"tracking: {{enabled: true, uri: '{uri}', experiment: sw}}\n"
                 "grid: {methods: [codi], latents: [2], seeds: [0]}\n")
    with pytest.raises(type(err)):
        run_sweep(str(f), out=str(tmp_path / "sw"))
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    assert parent.info.status == status
    assert parent.data.tags.get("simcot.error") == ("RuntimeError: cell exploded" if status == "FAILED" else None)
