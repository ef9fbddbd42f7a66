"""The benchmark scripts that a GPU session will run in one go still run: a CPU smoke run each
(the figures themselves are measured on a GPU, never asserted here)."""

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_bench_rollout():
    """benchmarks/bench_rollout.py as a module (benchmarks/ is no package: on sys.path for the import only)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("bench_rollout")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread inside the block, as the rollout benchmark profiles; the suite's count after."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def test_land_sweep_grid_remakes_the_sweeps_tables_from_its_cells(tmp_path):
    """--grid: the sweep's tables re-made from its cell files (intervals, paired gains with their
    significance), headed by the sweep's commit and command, with the plots and one line per cell."""
    sweep = tmp_path / "sweep"
    (sweep / "cells").mkdir(parents=True)
    accuracy = {("coconut", 0): 0.40, ("coconut", 1): 0.50, ("coconut", 2): 0.45,
                ("simcot-coconut", 0): 0.60, ("simcot-coconut", 1): 0.72, ("simcot-coconut", 2): 0.64}
    for (method, seed), acc in accuracy.items():
        (sweep / "cells" / f"{method}-L4-s{seed}.json").write_text(json.dumps(
            {"method": method, "latents": 4, "seed": seed, "train_seconds": 30.0, "run_id": "x",
             "metrics": {"test/accuracy": acc, "test/samples_per_s": 99.0, "test/latent_cos_within": 0.5}}))
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "land_sweep_cells.py"), str(sweep), "--grid",
                        "--name", "grid", "--commit", "abc123", "--command", "simcot sweep X", "--title", "Toy grid.",
                        "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "grid"
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("Measured ") and "`abc123`" in md[0] and md[0].endswith("`simcot sweep X`")
    assert md[2] == "Toy grid."
    # gains 0.20, 0.22, 0.19: mean 20.3 points, t interval 20.3 +- 4.303 * 1.53 / sqrt(3)
    assert "| simcot-coconut | coconut | 4 | 3 | +20.3 | [+16.5, +24.1] | yes |" in md
    assert "| coconut | 45.0 [40.0, 50.0] |" in md
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [(c["cell"], c["accuracy"]) for c in cells][:2] == [("coconut-L4-s0", 0.4), ("coconut-L4-s1", 0.5)]
    assert "samples_per_s" not in cells[0] and len(cells) == 6
    assert {f.name for f in out.iterdir()} == {"results.md", "results.json", "results.csv", "cells.jsonl",
                                              "accuracy_vs_latents.png", "latent_cos_vs_latents.png"}
    assert json.loads((out / "results.json").read_text())["meta"]["commit"] == "abc123"


def test_rollout_floor_counts_linear_and_attention_matmuls_apart():
    """The rollout benchmark's floor table splits a profiled call's CPU time into the linear
    layers' matmuls (mm/addmm, with their FLOPs) and attention's batched ones (bmm)."""
    bench_rollout = import_bench_rollout()
    import torch
    x, w, q, k = torch.randn(2048, 192), torch.randn(512, 192), torch.randn(64, 1, 48), torch.randn(64, 48, 40)

    # One thread, as the benchmark profiles; each side many calls of a size whose time is the matmul's:
    # the ops around each mm (linear, t, matmul) cost the same per call, and with 256-row inputs, one
    # linear call against 50 bmm calls and two threads on a loaded machine, the shares swung from run
    # to run (linear 0.74 in a CI run of 2026-12-07; attention 0.02 with two busy loops beside it).
    with one_torch_thread():
        only_linear = bench_rollout.matmul_shares(lambda: [torch.nn.functional.linear(x, w) for _ in range(20)])
        mixed = bench_rollout.matmul_shares(lambda: ([q @ k for _ in range(400)],
                                                     [torch.nn.functional.linear(x, w) for _ in range(5)]))
    assert only_linear["linear_share"] > 0.8 and only_linear["attention_share"] == 0.0
    assert only_linear["step_attention_share"] == 0.0  # no call of the steps' attention
    assert 1.0 < only_linear["linear_gflops"] < 1e4  # 20 x 2*2048*192*512 FLOPs counted, over their time
    assert mixed["attention_share"] > 0.05 and mixed["linear_share"] > 0.05
    assert mixed["linear_share"] + mixed["attention_share"] <= 1.0


def test_rollout_floor_times_the_whole_step_attention_inclusive():
    """The floor table's attention-free bound divides by 1 - the step attention's share: the whole
    time of `step_attention.cached_step_attention` (both matmuls, mask, softmax), not only its
    bmm calls, and only while profiling (the function is itself again after; a call without it has
    a share of 0: the test before)."""
    bench_rollout = import_bench_rollout()
    import torch
    from simcot.models import step_attention

    own = step_attention.cached_step_attention
    q, k, v = torch.randn(64, 4, 1, 48), torch.randn(64, 4, 40, 48), torch.randn(64, 4, 40, 48)
    mask = torch.zeros(64, 1, 1, 40)
    with one_torch_thread():
        only_attention = bench_rollout.matmul_shares(
            lambda: [step_attention._attention(None, q, k, v, mask) for _ in range(100)])
    assert step_attention.cached_step_attention is own
    # inclusive: its bmm calls and the softmax, mask add and output copy around them
    assert only_attention["step_attention_share"] > only_attention["attention_share"] > 0.0
    assert only_attention["step_attention_share"] > 0.8


def test_rollout_baseline_runs_no_more_samples_than_its_batch_holds():
    """The baseline's samples/s divide by the samples it ran: the largest batch's first rows. With
    batches smaller than the samples asked (--eval-batches 1), the count used to stay at what was
    asked, and the baseline looked 4x faster than it was."""
    bench_rollout = import_bench_rollout()
    assert bench_rollout.baseline_samples(8, False, [1, 32, 256]) == 8
    assert bench_rollout.baseline_samples(8, True, [1, 32, 256]) == 4
    assert bench_rollout.baseline_samples(8, True, [1]) == 1
    assert bench_rollout.baseline_samples(8, False, [1, 2]) == 2
