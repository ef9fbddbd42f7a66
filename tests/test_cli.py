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


def _one_error_line(p, message: str) -> None:
    """Issue 15 (8): exit 2, the error as one line on stderr, no traceback."""
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [l for l in p.stderr.splitlines() if l.startswith("simcot: error: ")]
    assert len(errors) == 1 and message in errors[0], p.stderr[-3000:]


def test_expected_failures_are_one_line_and_the_traceback_needs_debug(tmp_path):
    tiny = [f"--{k}={v}" for k, v in tiny_overrides(tmp_path, **{"train.epochs": 1}).items()]
    p = run(["train", *tiny, "--model.name", "tiny-llamaa"], tmp_path, check=False)
    _one_error_line(p, "model.name 'tiny-llamaa' is not a preset, a local folder or a reachable hub id "
                       "(did you mean 'tiny-llama'?)")
    p = run(["train", *tiny, "--model.name", "tiny-llamaa", "--debug"], tmp_path, check=False)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError: model.name 'tiny-llamaa'" in p.stderr

    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"1+1||<<1+1=2>> #### 2\ncaf\xe9||<<1=1>> #### 1\n")
    p = run(["train", *tiny, "--data.source", "aug", "--data.train_file", str(bad)], tmp_path, check=False)
    _one_error_line(p, f"{bad}:2: not UTF-8 text (byte 0xe9 at column 4)")

    nan = [f"--{k}={v}" for k, v in tiny_overrides(tmp_path, **{"train.epochs": 1, "train.run_name": "nan",
                                                                 "train.lr": 1e30, "train.warmup_steps": 0,
                                                                 "train.grad_clip": 0}).items()]
    p = run(["train", *nan], tmp_path, check=False)
    _one_error_line(p, "non-finite loss at step")

    summary = json.loads(run(["train", *tiny], tmp_path).stdout)
    p = run(["train", *tiny], tmp_path, check=False)  # the same run name again
    _one_error_line(p, f"run folder {tmp_path / 'runs' / 't'} already exists")
    weights = Path(summary["checkpoint"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    p = run(["eval", "--checkpoint", summary["run_dir"]], tmp_path, check=False)
    _one_error_line(p, f"{weights}: damaged safetensors file")
    p = run(["eval", "--checkpoint", str(tmp_path / "nowhere")], tmp_path, check=False)
    _one_error_line(p, "no checkpoint found at")
