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


def test_land_sweep_cells_tabulates_the_chosen_methods_cells(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "cells").mkdir(parents=True)
    for method, seed, acc in (("cot", 0, 1.0), ("cot", 1, 0.9), ("nocot", 0, 0.4)):
        cell = f"{method}-L0-s{seed}"
        (sweep / "cells" / f"{cell}.json").write_text(json.dumps(
            {"method": method, "latents": 0, "seed": seed, "train_seconds": 10.0 + seed, "run_id": "x",
             "metrics": {"test/accuracy": acc}}))
        ckpt = sweep / "runs" / cell / "checkpoints"
        (ckpt / "step_0000010").mkdir(parents=True)
        (ckpt / "latest").write_text("step_0000010")
        (ckpt / "step_0000010" / "config.yaml").write_text("train: {epochs: 20}\n")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "land_sweep_cells.py"), str(sweep), "--methods", "cot",
                        "--name", "cells", "--commit", "abc123", "--command", "simcot sweep X", "--results-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads((tmp_path / "cells.json").read_text())
    assert [(r["cell"], r["epochs"], r["test_accuracy"]) for r in data["cells"]] == [("cot-L0-s0", 20, 1.0),
                                                                                     ("cot-L0-s1", 20, 0.9)]
    assert data["meta"]["commit"] == "abc123" and data["meta"]["command"] == "simcot sweep X"
    md = (tmp_path / "cells.md").read_text()
    assert "| cot | 0 | 1 | 20 | 90.0 | 11 |" in md and "| cot: mean over 2 |  |  |  | 95.0 +- 7.1 (min 90.0) |  |" in md
