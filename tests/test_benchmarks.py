"""The benchmark scripts that a GPU session will run in one go still run: a CPU smoke run each
(the figures themselves are measured on a GPU, never asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_measures_a_method_and_reports_the_plan(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # torch reads both
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--setups", "tiny-full",
                        "--device", "cpu", "--warmup", "1", "--methods", "codi", "--chain", "3", "--quick",
                        "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = tmp_path / "train_step_cpu_quick.json"
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["method"] == "codi" and row["rc"] == 0 and row["status"] == "ok" and row["params"] > 1e6
    assert row["zero"] == 0 and row["lora"] == 0 and row["trainable"] >= row["params"]
    assert len(row["warmup_s"]) == 1 and row["step_s"] > 0 and row["tokens"] > 0
    assert row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0 and row["mfu"] is None  # no peak FLOP/s on CPU
    assert row["plan_fits"] and row["plan_gpu_gib"] > 0
    assert data["meta"]["device"] == "cpu" and data["meta"]["threads"] == 1
    assert "| tiny-full | codi |" in out.with_suffix(".md").read_text()
