"""A regular (non-editable) install carries every sub-package and no generic top-level names."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_regular_install_imports_from_another_folder(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert "simcot" in top and not top & {"models", "train", "kernels", "launchers", "tests"}, top
    code = ("import simcot.train.methods, simcot.train.runner, simcot.models.decoding, simcot.kernels, "
            "simcot.launchers.cli, simcot; print(simcot.train.methods.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    shipped = {p.name for p in (target / "simcot" / "launchers").rglob("*") if p.is_file()}
    assert "cli.py" in shipped


def test_env_check_fails_when_torch_is_not_the_requested_build():
    import importlib.metadata as md

    from simcot.launchers.check_env import main

    installed = md.version("torch").split("+")[0]
    assert main(["--torch-spec", f"torch=={installed}"]) == 0
    assert main(["--torch-spec", "torch==0.0.1"]) == 1


def test_installed_transformers_is_within_the_declared_range():
    """setup.cfg's floor is a version the suite was run on (the code uses transformers 5 names);
    the one installed here must not be older."""
    import configparser
    import importlib.metadata as md
    import re

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    req = next(r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip().startswith("transformers"))
    floor = re.fullmatch(r"transformers>=([\d.]+)", req)
    assert floor, req

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:3])

    assert version(floor.group(1)) >= (5, 0)  # tokenizer.py passes replace_extra_special_tokens (5.x)
    assert version(md.version("transformers")) >= version(floor.group(1))


def test_from_the_repository_root_import_kernels_is_hugging_faces_package():
    """`python -m` / `-c` in a checkout put its root on sys.path, where `import kernels` finds the
    repository's kernels/ folder. transformers 5.25+ imports Hugging Face's `kernels` (one of its
    dependencies) with every model: the folder hands the import over to that package."""
    import importlib.metadata as md

    import pytest
    try:
        md.version("kernels")
    except md.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25)")
    code = "import kernels, simcot.kernels as k; from transformers import LlamaForCausalLM; print(kernels.__file__, k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours = out.stdout.split()
    assert Path(theirs).parent.parent != REPO and ours == str(REPO / "kernels" / "__init__.py")


def test_without_another_kernels_package_the_folder_says_so_in_one_line():
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import kernels"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("ImportError: No module named 'kernels' outside the simcot "
                                                   "repository (its kernels/ folder is imported as simcot.kernels)")
