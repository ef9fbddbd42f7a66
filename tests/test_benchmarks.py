"""The benchmark scripts that a GPU session will run in one go still run: a CPU smoke run each
(the figures themselves are measured on a GPU, never asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_measures_a_method_and_reports_the_plan(tmp_path):
    out = tmp_path / "step.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--model", "tiny-llama",
                        "--device", "cpu", "--steps", "2", "--methods", "codi", "--zero", "0", "--chain", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["method"] == "codi" and row["rc"] == 0 and row["params"] > 1e6
    assert row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0 and row["mfu"] is None  # no peak FLOP/s on CPU
    assert row["plan_fits"] and row["plan_gpu_gib"] > 0
    assert "| codi |" in out.with_suffix(".md").read_text()
