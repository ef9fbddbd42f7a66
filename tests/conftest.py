"""Test-wide setup: the Triton interpreter (before any kernel module is imported), a private
MLflow store per test session, and helpers that build tiny configs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import weakref  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SIMCOT_DATA_DIR", REPO.parent / "shared" / "data"))

# two threads, or one in each of pytest-xdist's workers (`make test`: a worker per core; more threads than
# cores spin-wait)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True, scope="session")
def _mlflow_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns.db'}"
    yield


@pytest.fixture(autouse=True)
def _tracking_uri_kept():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: a test that points a tracker at a
    store of its own (a server, a folder) must not hand it to the subprocesses of later tests
    (test_compare's server before test_cli's training subprocess: a connection error)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def tiny_overrides(tmp_path, **extra) -> dict:
    """Overrides for a seconds-long run: a 2-layer 32-wide llama on 3-step arithmetic."""
    base = {
        "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.vocab_size": 300,
        "data.n_train": 64, "data.n_val": 8, "data.n_test": 8, "data.steps": 2,
        "train.out_dir": str(tmp_path / "runs"), "train.run_name": "t", "train.epochs": 2,
        "train.batch_size": 16, "train.micro_batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 2,
        "train.log_every": 1, "eval.batch_size": 8, "eval.max_new_tokens": 24, "tracking.enabled": False,
    }
    base.update(extra)
    return base


@pytest.fixture
def tiny(tmp_path):
    def make(**extra):
        from simcot.train.assemble import load_config

        ov = tiny_overrides(tmp_path, **extra)
        return load_config(None, ov), ov

    return make


def run_losses(run_dir) -> dict[int, float]:
    """Loss per step from a run's metrics.jsonl (a resumed run appends: the last record wins)."""
    import json

    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def fail_at(monkeypatch, step: int, error: BaseException):
    """Make the optimizer step after `step` raise `error`; returns the real step (to restore)."""
    from simcot.train import loop as loop_mod

    real_step = loop_mod.Trainer.train_step

    def failing_step(self, state, order):
        if state.global_step == step:
            raise error
        return real_step(self, state, order)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", failing_step)
    return real_step


def crash_at(monkeypatch, step: int, cfg) -> None:
    """Run `cfg` until the optimizer step after `step`, where it dies (KeyboardInterrupt)."""
    from simcot.train import loop as loop_mod
    from simcot.train.runner import run_training

    real_step = fail_at(monkeypatch, step, KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    finally:
        monkeypatch.setattr(loop_mod.Trainer, "train_step", real_step)


class Created(TorchDispatchMode):
    """Weak references to every tensor an ATen op returns, with its dtype and shape (what a kernel
    or a backward makes, e.g. whether a V x H gradient ever exists)."""

    def __init__(self):
        super().__init__()
        self.made = []  # (weakref, dtype, shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.append((weakref.ref(t), t.dtype, tuple(t.shape)))
        return out

    @property
    def shapes(self) -> list[tuple]:
        return [shape for _, _, shape in self.made]
