"""Re-measure every figure of README.md's "Measured" section, write the results files, render the READMEs.

    make measure                                     # every row (the suite from a fresh clone too)
    python benchmarks/measure.py --only default,semcot
    python benchmarks/measure.py --skip suite,kernels
    python benchmarks/measure.py --only default --seeds 0 --threads 1

Rows (each writes ``benchmarks/results/NAME.{json,md}`` through ``results_io.write_results``, which
records the commit, date, machine, load and threads; README blocks ``<!-- results:NAME -->`` show
the ``.md`` verbatim):

  default   ``simcot train`` with no options, on seeds 0, 1, 2 (``--train.seed S --data.seed S``),
            one after the other, each in a fresh process: accuracy per seed and mean +- std,
            steps, tokens/s, wall, load                                      -> default_cpu
  suite     a fresh clone of this commit runs ``bash .ci/run`` (venv set-up + the whole test
            suite); the pass / skip counts and the wall time                  -> suite_cpu
  kernels   ``bench_linear_cross_entropy.py``, ``bench_latent_feedback.py`` (their own CLIs and
            results files)                                     -> linear_cross_entropy_cpu, latent_feedback_cpu
  rollout   ``bench_rollout.py`` (training step, evaluation, the compiled decode step) -> rollout_cpu
  semcot    the toy pipeline: ``cot-toy.yaml`` (the answerer, a CoT / direct mix), then
            ``semcot-toy.yaml``, then ``bench_semcot.py``: SemCoT against the answerer's own CoT
            and direct answers, accuracy, tokens and time                     -> semcot_cpu

Each benchmark runs with the command its committed figure records (``tests/test_measure.py``
checks that the two agree). Runs go to ``--workdir`` (default ``runs/measure``, MLflow store inside it). Training on CPU is
deterministic: the same command, seed and commit give the same losses and accuracies
(``tests/test_measure.py`` checks it on a short run); times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from results_io import machine_meta, write_results  # noqa: E402

ROWS = ("default", "suite", "kernels", "rollout", "semcot")
_TOK_S = re.compile(r"\| ([\d.]+) tok/s")


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"measure.py: unknown row(s) {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    return names


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], log: Path, threads: int, cwd: Path = REPO) -> tuple[str, str, float]:
    """Run `cmd`, its stdout + stderr into `log`; (stdout, stderr, wall seconds). A failure stops measure.py."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode:
        raise SystemExit(f"measure.py: {cmd[0]} ... exited {p.returncode}; see {log}")
    return p.stdout, p.stderr, wall


def _summary(stdout: str) -> dict:
    """The JSON summary `simcot train` prints last."""
    start = stdout.rfind("\n{\n")
    return json.loads(stdout[start + 1:] if start >= 0 else stdout[stdout.index("{"):])


def _simcot(*args: str) -> list[str]:
    return [sys.executable, "-m", "simcot.launchers.cli", *args]


def _flags(overrides: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


# ------------------------------------------------------------------------------------ default


CODE = ("train", "models", "kernels", "launchers", "setup.cfg", "pyproject.toml")  # what a training run depends on


def _same_code(commit: str) -> bool:
    """The training code at `commit` equals the working tree's (docs and results may differ)."""
    return bool(commit) and subprocess.run(["git", "diff", "--quiet", commit, "--", *CODE], cwd=REPO).returncode == 0


def train_default(seed: int, threads: int, workdir: Path, extra: dict | None = None, resume: bool = False) -> dict:
    """One `simcot train` (defaults + seed) in a fresh process: the figures of one seed (kept in
    ``workdir/default-s<seed>.json``; with `resume`, a seed measured before at this commit is reused)."""
    name = f"default-s{seed}"
    record = workdir / f"{name}.json"
    commit = machine_meta("cpu", command="")["commit"]
    if resume and record.is_file():
        old = json.loads(record.read_text())
        if _same_code(old.get("commit", "")) and old.get("extra") == (extra or {}) and old.get("threads") == threads:
            print(f"reusing {record}", flush=True)
            return old["run"]
    ov = {"train.seed": seed, "data.seed": seed, "train.threads": threads, "train.run_name": name,
          "train.out_dir": str(workdir / "runs"), "tracking.uri": f"sqlite:///{workdir / 'mlruns.db'}", **(extra or {})}
    shutil.rmtree(workdir / "runs" / name, ignore_errors=True)  # a fresh run, not a continuation of a cut one
    load0 = os.getloadavg()[0]
    out, err, wall = _run(_simcot("train", *_flags(ov)), workdir / "logs" / f"{name}.log", threads)
    s = _summary(out)
    losses = [json.loads(line)["loss"] for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    tok_s = [float(x) for x in _TOK_S.findall(err)]
    run = {"seed": seed, "commit": commit, "val_accuracy": s.get("val_accuracy"), "test_accuracy": s["test_accuracy"],
            "test_n": s["metrics"].get("test/n"), "test_generated_tokens": s["metrics"].get("test/generated_tokens"),
            "test_samples_per_s": s.get("test_samples_per_s"), "steps": s["steps"], "final_loss": s["final_loss"],
            # every step's loss, hashed: equal digests = the same training, step for step
            "loss_digest": hashlib.sha256(json.dumps(losses).encode()).hexdigest()[:16],
            "tokens_per_s_median": statistics.median(tok_s) if tok_s else None,
            "train_seconds": s["train_seconds"], "wall_seconds": wall,
            "load_avg_1m_start": round(load0, 2), "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    record.write_text(json.dumps({"commit": commit, "extra": extra or {}, "threads": threads, "run": run}, indent=1))
    return run


def default_markdown(runs: list[dict], threads: int, planned: list[int] | None = None) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["`simcot train` with no options (`--train.seed S --data.seed S`), one seed after the other, "
             f"{threads} torch thread(s):", "",
             "| seed | val accuracy (%) | test accuracy (%) | steps | final loss | tokens/s (median) | train (s) "
             "| wall (s) | load (start / end) | test samples/s | generated tokens / answer |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {pct(r['val_accuracy'])} | {pct(r['test_accuracy'])} | {r['steps']} | "
                     f"{r['final_loss']:.4f} | {r['tokens_per_s_median']:.0f} | {r['train_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {r['load_avg_1m_start']} / {r['load_avg_1m_end']} | "
                     f"{r['test_samples_per_s']:.0f} | {r['test_generated_tokens']:.1f} |")
    test = [100 * r["test_accuracy"] for r in runs]
    val = [100 * r["val_accuracy"] for r in runs]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    lines += ["", f"Test accuracy **{statistics.fmean(test):.1f} ± {sd(test):.1f} %** (mean ± std over "
              f"{len(runs)} seed(s), min {min(test):.1f} %); val {statistics.fmean(val):.1f} ± {sd(val):.1f} %. "
              "Tokens/s and wall time depend on the load (other processes on the same cores)."]
    commits = sorted({r["commit"][:10] for r in runs if r.get("commit")})
    if len(commits) > 1:  # --resume reused seeds measured before a change that left the training code alone
        lines.append(f"The seeds ran at commits {', '.join(commits)}, whose training code is the same.")
    missing = [s for s in planned or [] if s not in {r["seed"] for r in runs}]
    if missing:
        lines.append(f"Seed(s) {', '.join(map(str, missing))} not measured yet (the run was cut short).")
    return "\n".join(lines)


def measure_default(args, workdir: Path, extra: dict | None = None, name: str = "default_cpu",
                    results_dir: Path | None = None) -> dict:
    meta = _meta(args.threads)  # the commit the runs start from, not the one at their end
    runs = []
    for seed in args.seeds:  # the results file is rewritten after every seed: a cut-short run keeps its seeds
        runs.append(train_default(seed, args.threads, workdir, extra, getattr(args, "resume", False)))
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB, the largest child so far
        data = {"runs": runs, "seeds_planned": list(args.seeds), "peak_rss_mib_largest_run": round(rss),
                "extra_overrides": extra or {}}
        write_results(name, data, default_markdown(runs, args.threads, args.seeds), meta=meta,
                      results_dir=results_dir)
    return data


# ------------------------------------------------------------------------------------ other rows


def _meta(threads: int) -> dict:
    meta = machine_meta("cpu", command="python benchmarks/measure.py " + " ".join(map(shlex.quote, sys.argv[1:])))
    meta["threads"] = threads  # the runs' threads (they are child processes), not this process's
    return meta


def measure_suite(args, workdir: Path) -> None:
    meta = _meta(args.threads)
    with tempfile.TemporaryDirectory(prefix="simcot-clone-") as tmp:
        clone = Path(tmp) / "simcot"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        if (REPO.parent / "shared").is_dir():  # as CI lays it out: the shared data beside the clone
            (Path(tmp) / "shared").symlink_to(REPO.parent / "shared")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        out, err, wall = _run(["bash", ".ci/run"], workdir / "logs" / "suite.log", args.threads, cwd=clone)
        pytest_args = re.search(r"^PYTEST_ARGS \?= (.*)$", (clone / "Makefile").read_text(), re.M).group(1)
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?)", out + err))
    data = {"clone_commit": head, "wall_seconds": wall, "pytest_args": pytest_args, **counts}
    md = ("| command | pytest arguments | passed | skipped | wall (set-up of the venv included) |\n"
          "|---|---|---:|---:|---:|\n"
          f"| `git clone ... && bash .ci/run` | `{pytest_args}` | {counts.get('passed', 0)} | "
          f"{counts.get('skipped', 0)} | {wall / 60:.1f} min |")
    write_results("suite_cpu", data, md, meta=meta)


# The benchmarks' options, as their figures in the READMEs were measured
BENCH_ARGS = {
    "bench_linear_cross_entropy.py": ["--iters", "3", "--max-seconds", "120", "--variants",
                                      "eager,fused-torch,fused-torch-previous,fused-torch-recompute"],
    "bench_latent_feedback.py": ["--iters", "7"],
    "bench_rollout.py": ["--rounds", "3", "--compiled"],
    "bench_semcot.py": ["--device", "cpu", "--n", "250", "--batch-sizes", "250,16", "--repeats", "1"],
}


def _bench(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args, *BENCH_ARGS[script]]


def measure_kernels(args, workdir: Path) -> None:
    for script in ("bench_linear_cross_entropy.py", "bench_latent_feedback.py"):
        _run(_bench(script), workdir / "logs" / f"{script}.log", args.threads)


def measure_rollout(args, workdir: Path) -> None:
    _run(_bench("bench_rollout.py"), workdir / "logs" / "bench_rollout.log", args.threads)


def measure_semcot(args, workdir: Path) -> None:
    common = {"train.out_dir": str(workdir / "runs"), "train.threads": args.threads,
              "tracking.uri": f"sqlite:///{workdir / 'mlruns.db'}"}
    runs = workdir / "runs"
    for name in ("cot-toy", "semcot-toy"):  # fresh runs, not continuations of earlier ones
        shutil.rmtree(runs / name, ignore_errors=True)
    _run(_simcot("train", "--config", "launchers/recipes/cot-toy.yaml", *_flags(common)),
         workdir / "logs" / "cot-toy.log", args.threads)
    _run(_simcot("train", "--config", "launchers/recipes/semcot-toy.yaml", *_flags(
        {**common, "train.init_from": str(runs / "cot-toy")})), workdir / "logs" / "semcot-toy.log", args.threads)
    # batch 16 (latency-bound: CoT pays one step per generated token) and the whole test set at once;
    # the runs named relative to the repository (the figure's command says where they were, not whose disk)
    _run(_bench("bench_semcot.py", "--cot", os.path.relpath(runs / "cot-toy", REPO), "--semcot",
                os.path.relpath(runs / "semcot-toy", REPO)), workdir / "logs" / "bench_semcot.log", args.threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help=f"comma-separated rows to run (default all: {','.join(ROWS)})")
    ap.add_argument("--skip", default="", help="comma-separated rows not to run (e.g. suite)")
    ap.add_argument("--seeds", default="0,1,2", help="default row: seeds, run one after the other")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every run (OMP_NUM_THREADS too)")
    ap.add_argument("--workdir", default="runs/measure", help="runs, logs and the MLflow store")
    ap.add_argument("--no-render", action="store_true", help="do not re-render the README blocks")
    ap.add_argument("--resume", action="store_true", help="default row: reuse the seeds already measured in "
                    "--workdir at this commit with the same threads (a cut-short measurement continues)")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = [r for r in (_names(args.only) or ROWS) if r not in _names(args.skip)]
    workdir = (REPO / args.workdir).resolve()
    steps = {"default": measure_default, "suite": measure_suite, "kernels": measure_kernels,
             "rollout": measure_rollout, "semcot": measure_semcot}
    for row in rows:
        print(f"== {row}", flush=True)
        steps[row](args, workdir)
    if not args.no_render:
        import render_readme

        render_readme.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
