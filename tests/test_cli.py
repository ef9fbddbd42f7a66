"""The `simcot` console script, run as a user runs it: in a subprocess, from another folder."""

import json
import os
import subprocess
import sys
from pathlib import Path


from conftest import SHARED_DATA, tiny_overrides

SIMCOT = str(Path(sys.executable).with_name("simcot"))


def run(args, cwd, check=True, timeout=300):
    env = dict(os.environ, SIMCOT_DATA_DIR=str(SHARED_DATA))
    p = subprocess.run([SIMCOT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"simcot {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_help_lists_commands_and_options(tmp_path):
    top = run(["--help"], tmp_path).stdout
    assert all(c in top for c in ("train", "eval", "data"))
    train_help = run(["train", "--help"], tmp_path).stdout
    assert "--train.batch_size=64" in train_help and "Global batch size" in train_help
    assert "--source='arith'" in run(["data", "--help"], tmp_path).stdout


def test_data_writes_icot_and_aug_files(tmp_path):
    run(["data", "--source", "mult", "--digits", "4", "--n", "25", "--seed", "0", "--format", "icot",
         "--out", "m.txt"], tmp_path)
    lines = (tmp_path / "m.txt").read_text().splitlines()
    assert len(lines) == 25 and all(" * " in l and "||" in l and "####" in l for l in lines)
    if SHARED_DATA.is_dir():
        run(["data", "--source", "gsm8k", "--split", "test", "--format", "aug", "--out", "test.txt"], tmp_path)
        aug = (tmp_path / "test.txt").read_text().splitlines()
        assert len(aug) == 1319 and aug[0].endswith("||<<16-3-4=9>> <<9*2=18>> #### 18")


def test_unknown_key_fails_with_its_name(tmp_path):
    p = run(["train", "--train.lrr", "1"], tmp_path, check=False)
    assert p.returncode == 2
    assert "simcot: error: unknown config key 'train.lrr' (did you mean 'lr'?)" in p.stderr


def test_malformed_data_stops_before_training(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1+1||<<1+1=2>> #### 2\n2+2 <<2+2=4>> #### 4\n")
    p = run(["train", "--data.source", "aug", "--data.train_file", str(bad), "--tracking.enabled", "false",
             "--train.out_dir", str(tmp_path / "runs")], tmp_path, check=False)
    assert p.returncode == 2
    assert f"{bad}:2: missing '||' between question and reasoning" in p.stderr
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


def test_train_with_yaml_then_eval_the_checkpoint(tmp_path):
    ov = tiny_overrides(tmp_path, **{"tracking.enabled": True, "train.run_name": "cli"})
    yaml_cfg = tmp_path / "cfg.yaml"
    yaml_cfg.write_text("method: cot\ntrain:\n  epochs: 1\n")
    args = ["train", "--config", str(yaml_cfg)] + [f"--{k}={v}" for k, v in ov.items() if k != "train.epochs"]
    summary = json.loads(run(args, tmp_path).stdout)
    assert summary["steps"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["tracking_uri"] == os.environ["MLFLOW_TRACKING_URI"]
    ev = json.loads(run(["eval", "--checkpoint", summary["run_dir"], "--eval.split", "val"], tmp_path).stdout)
    assert ev["split"] == "val" and ev["n"] == 8
    preds = [json.loads(l) for l in Path(ev["predictions"]).read_text().splitlines()]
    assert len(preds) == 8 and {"gold", "prediction", "correct", "generated"} <= set(preds[0])
