"""benchmarks/measure.py: the same command, seed and commit give the same numbers on CPU."""

import importlib.util
import json
import types
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("measure", REPO / "benchmarks" / "measure.py")
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)

# what depends on the machine and its load, not on the training
TIMING = {"tokens_per_s_median", "train_seconds", "wall_seconds", "load_avg_1m_start", "load_avg_1m_end",
          "test_samples_per_s"}


def test_two_measurements_of_the_default_row_give_identical_numbers(tmp_path):
    extra = {k: v for k, v in tiny_overrides(tmp_path).items() if k not in ("train.out_dir", "train.run_name")}
    extra["train.epochs"] = 1
    args = types.SimpleNamespace(seeds=[3], threads=1)
    got = []
    for rep in ("a", "b"):
        measure.measure_default(args, tmp_path / rep, extra, name="d", results_dir=tmp_path / rep / "results")
        data = json.loads((tmp_path / rep / "results" / "d.json").read_text())
        assert data["meta"]["threads"] == 1 and data["meta"]["commit"]
        got.append([{k: v for k, v in r.items() if k not in TIMING} for r in data["runs"]])
    assert got[0] == got[1]
    run = got[0][0]
    assert run["seed"] == 3 and run["steps"] == 4 and len(run["loss_digest"]) == 16 and run["test_n"] == 8
    md = (tmp_path / "a" / "results" / "d.md").read_text()
    assert md.startswith("Measured ") and "| 3 | " in md and "mean ± std over 1 seed(s)" in md


def test_each_benchmark_row_runs_the_command_its_committed_figure_records(monkeypatch):
    """`make measure` regenerates the README's figures: each benchmark it runs gets the options
    (and run folders) that the committed results file says its figure was measured with. (It
    used to pass bench_rollout.py an option the script does not have.)"""
    import os
    import shlex

    ran = []
    monkeypatch.setattr(measure, "_run", lambda cmd, *a, **k: ran.append(cmd) or ("", "", 0.0))
    args = types.SimpleNamespace(threads=1)
    workdir = REPO / "runs" / "measure"
    for row in (measure.measure_kernels, measure.measure_rollout, measure.measure_semcot):
        row(args, workdir)
    results = {"bench_linear_cross_entropy.py": "linear_cross_entropy_cpu", "bench_latent_feedback.py":
               "latent_feedback_cpu", "bench_rollout.py": "rollout_cpu", "bench_semcot.py": "semcot_cpu"}
    benches = [cmd for cmd in ran if cmd[1].endswith(".py")]
    assert sorted(Path(cmd[1]).name for cmd in benches) == sorted(results)
    for cmd in benches:
        recorded = json.loads((REPO / "benchmarks" / "results" / f"{results[Path(cmd[1]).name]}.json").read_text())
        command = "python " + " ".join(shlex.quote(c) for c in [os.path.relpath(cmd[1], REPO), *cmd[2:]])
        assert command == recorded["meta"]["command"]


def test_a_tree_changed_only_in_what_measuring_writes_is_not_dirty(tmp_path, monkeypatch):
    """`make measure` runs its rows one after the other: each later row found the results files and
    README blocks of the rows before it changed, and its figures were marked `+dirty`."""
    import subprocess
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import results_io
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    repo = tmp_path / "repo"
    for path in ("README.md", "benchmarks/README.md", "benchmarks/results/x.json", "train/loop.py"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("v1\n")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    monkeypatch.setattr(results_io, "REPO", repo)
    assert results_io.machine_meta()["dirty"] is False
    for path in ("README.md", "benchmarks/README.md", "benchmarks/results/x.json"):  # what a row writes
        (repo / path).write_text("v2\n")
    (repo / "benchmarks" / "results" / "new.json").write_text("{}")  # untracked
    assert results_io.machine_meta()["dirty"] is False
    (repo / "train" / "loop.py").write_text("v2\n")  # the code measured
    assert results_io.machine_meta()["dirty"] is True
