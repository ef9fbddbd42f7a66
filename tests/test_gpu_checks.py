"""benchmarks/gpu_checks.sh imports the installed simcot, never the repository's own simcot/ folder.

A lent GPU gives 15 minutes once; a script whose steps import the repo folder (which lacks
kernels/, train/...: setup.cfg maps them only on install) loses it on the first import. The script's
`where` part runs the same install path and the same Python launcher (`py`) as every step; here the
installed package is a marked fake in a --target-like folder, and this venv's editable simcot is
behind it on sys.path, so only the repo folder on sys.path (the working directory) could win.

The whole CPU rehearsal (minutes, and a bare venv with the carried wheels) runs only when
SIMCOT_REHEARSAL_PYTHON names that venv's python: see benchmarks/README.md, "Running the GPU checks".
"""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_checks.sh"


def run_script(part: str, tmp_path: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), part], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fake_site(tmp_path: Path) -> Path:
    """An installed simcot with what tests/test_kernel_cuda.py imports (the repo folder has no kernels/)."""
    site = tmp_path / "site"
    (site / "simcot" / "kernels").mkdir(parents=True)
    (site / "simcot" / "__init__.py").write_text("INSTALLED = True\n")
    (site / "simcot" / "kernels" / "__init__.py").write_text(
        "print('FAKE INSTALLED KERNELS')\n"  # the dev venv's editable finder would supply the real ones
        "fused_linear_cross_entropy = latent_feedback = latent_feedback_reference = "
        "linear_cross_entropy_reference = None\n")
    return site


def test_the_steps_python_imports_the_installed_simcot(tmp_path):
    site = fake_site(tmp_path)
    p = run_script("where", tmp_path, 120, INSTALL="0", SITE=str(site))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"simcot from {site}/simcot/__init__.py" in p.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"^== imports: rc=0 in \d+ s \(estimated ~5 s\)$", summary, re.M), summary
    # pytest, as the cuda_tests step runs it, collects the CUDA tests from the installed package
    assert re.search(r"^== collect: rc=0 in \d+ s", summary, re.M), p.stdout[-3000:]
    # as many as pytest collects from the repository's own test file (the same tests, nothing lost)
    ref = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_kernel_cuda.py")], capture_output=True, text=True, cwd=REPO)
    n = re.search(r"^(\d+) tests collected", ref.stdout, re.M)
    assert n and int(n[1]) > 0, ref.stdout[-2000:]
    assert re.search(rf"^{n[1]} tests collected", p.stdout, re.M), p.stdout[-3000:]
    assert "FAKE INSTALLED KERNELS" in p.stdout.split("== collect:")[1], p.stdout[-3000:]


def test_a_step_that_would_import_the_repo_folder_fails(tmp_path):
    """The check itself bites: the same check run from the repository root (the old script's way) fails."""
    site = fake_site(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    p = subprocess.run([sys.executable, "-c", "import simcot; print(simcot.__file__)"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == str(REPO / "simcot" / "__init__.py")  # the shadowing the script must avoid


def test_every_python_process_starts_through_py():
    """No step may call the interpreter directly (it would run in the repo with the repo on sys.path)."""
    lines = SCRIPT.read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("py() {")))
    end = start + lines[start:].index("}")
    direct = [f"{i + 1}: {ln}" for i, ln in enumerate(lines) if re.search(r"\$\{?PY\b", ln)
              and not start <= i <= end and not re.match(r"\s*(log |PY=)", ln)]  # only py() may use $PY
    assert not direct, "\n".join(direct)
    assert not re.search(r"^\s*(python3?|torchrun|deepspeed)\b", SCRIPT.read_text(), re.M)


def test_an_unknown_part_is_refused(tmp_path):
    p = run_script("all", tmp_path, 30)
    assert p.returncode == 2
    assert p.stderr.strip() == "usage: bash benchmarks/gpu_checks.sh kernels|train|decode|where (got 'all')"


@pytest.mark.skipif(not os.environ.get("SIMCOT_REHEARSAL_PYTHON"),
                    reason="the CPU rehearsal takes minutes: set SIMCOT_REHEARSAL_PYTHON to a bare venv's python")
@pytest.mark.parametrize("part", ["kernels", "train"])
def test_cpu_rehearsal(tmp_path, part):
    p = run_script(part, tmp_path, 1800, QUICK="1", PYTHON=os.environ["SIMCOT_REHEARSAL_PYTHON"])
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert p.returncode == 0, summary
    rcs = re.findall(r"^== (\w+): rc=(\d+)", summary, re.M)
    assert rcs and all(rc == "0" for _, rc in rcs), summary
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert "./meta.json" in tar.getnames()
    if part == "kernels":
        log = (tmp_path / "out" / "checks.log").read_text()
        assert re.search(r"\d+ skipped", log), "tests/test_kernel_cuda.py was not collected"


def test_gpu_results_lands_an_archive_and_renders_a_readme(tmp_path):
    """An archive as gpu_checks.sh packs it -> results files with the run's provenance -> README blocks."""
    import io
    import json
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_results

    meta = {"command": "bash benchmarks/gpu_checks.sh kernels", "commit": "0123456789abcdef", "dirty": False,
            "date": "2026-12-01 12:00 UTC", "device": "cuda", "machine": "x86_64", "cores": 16, "load_avg_1m": 0.5,
            "threads": 8, "torch": "2.11.0+cu128", "python": "3.12.3", "gpu": "NVIDIA H200", "part": "kernels",
            "quick": False}
    own = dict(meta, commit="unknown", command="python benchmarks/bench_train_step.py")  # a results_io file
    files = {"meta.json": json.dumps(meta),
             "latent_feedback_cuda.json": json.dumps({"rows": [1, 2]}),  # a benchmark without a meta block
             "latent_feedback_cuda.md": "| a |\n|---|\n| 1 |\n",
             "train_step_cuda.json": json.dumps({"meta": own, "rows": []}),
             "train_step_cuda.md": "Measured whenever: old provenance\n\n| b |\n|---|\n| 2 |\n"}
    archive = tmp_path / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    results = tmp_path / "results"
    shutil.copytree(REPO / "benchmarks" / "results", results)  # the README's other blocks stay renderable
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text() + "\n<!-- results:latent_feedback_cuda -->\n"
                      "<!-- /results:latent_feedback_cuda -->\n")
    assert gpu_results.main([str(archive), "--results-dir", str(results), "--readme", str(readme)]) == 0

    lf_md = (results / "latent_feedback_cuda.md").read_text()
    assert lf_md == ("Measured 2026-12-01 12:00 UTC at commit `0123456789` on NVIDIA H200, 8 torch threads, load 0.5, "
                     "torch 2.11.0+cu128: `bash benchmarks/gpu_checks.sh kernels (latent_feedback_cuda)`\n\n"
                     "| a |\n|---|\n| 1 |\n")
    assert json.loads((results / "latent_feedback_cuda.json").read_text())["rows"] == [1, 2]
    ts_md = (results / "train_step_cuda.md").read_text()
    assert ts_md.startswith("Measured 2026-12-01 12:00 UTC at commit `0123456789` on NVIDIA H200")  # commit filled in
    assert ts_md.endswith("`python benchmarks/bench_train_step.py`\n\n| b |\n|---|\n| 2 |\n")
    assert "<!-- results:latent_feedback_cuda -->\n" + lf_md + "<!-- /results:latent_feedback_cuda -->" in \
        readme.read_text()


def test_the_checks_write_results_only_into_their_archive(tmp_path, monkeypatch):
    """The steps' results files go to the archive's folder ($SIMCOT_RESULTS_DIR), never into
    benchmarks/results/: the old script backed that folder up and put it back at the end, which
    undid whatever else had written there meanwhile (a results file landed beside a rehearsal)."""
    text = SCRIPT.read_text()
    assert 'export SIMCOT_RESULTS_DIR="$WORK/results"' in text
    assert "benchmarks/results" not in text.replace("never into benchmarks/results/", "")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import results_io
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setenv("SIMCOT_RESULTS_DIR", str(tmp_path))
    path = results_io.write_results("probe_cpu", {"rows": []}, "| a |", meta={**results_io.machine_meta(), "command": "x"})
    assert path == tmp_path / "probe_cpu.json" and (tmp_path / "probe_cpu.md").is_file()
