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
