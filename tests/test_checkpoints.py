"""Loading checkpoints runs no code from them (issue 15, item 4): every torch.load is weights-only,
the RNG state is stored as tensors, DeepSpeed's loaders go through the same gate; a refused or
damaged file is an error naming it, and SIMCOT_TRUST_CHECKPOINTS=1 is the one way past it."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from simcot.train.engines.checkpoint import (TRUST_ENV, CheckpointError, load_rng_state, load_weights, rng_state,
                                    set_rng_state, weights_only_loads)
from simcot.train.config import Config
from simcot.train.engines.engine import TorchEngine


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do, made visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_loads_weights_only_and_restores_every_stream(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy keeps a cached gaussian: part of the state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # plain weights-only torch.load
    assert _draws() == expected
    (tmp_path / "rng_rank0.pt").write_bytes((tmp_path / "rng.pt").read_bytes())
    load_rng_state(tmp_path, 0)
    assert _draws() == expected


def test_rng_files_of_older_checkpoints_with_numpy_arrays_still_load(tmp_path):
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "rng_rank0.pt")
    expected = _draws()
    load_rng_state(tmp_path, 0)
    assert _draws() == expected


def _engine(tmp_path) -> TorchEngine:
    torch.manual_seed(0)
    engine = TorchEngine(torch.nn.Linear(4, 3), Config(), 10, torch.device("cpu"), 1)
    engine.save(tmp_path)
    return engine


def test_a_pickled_payload_in_the_optimizer_state_is_refused_not_run(tmp_path):
    engine = _engine(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'optimizer.pt'}: weights-only loading refused it "
                                              rf"\(.*GLOBAL io.open\); .*{TRUST_ENV}=1"):
        engine.load(tmp_path)
    assert not marker.exists()


def test_a_pickled_payload_in_the_rng_state_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"python": Payload(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match="rng_rank0.pt: weights-only loading refused it"):
        load_rng_state(tmp_path, 0)
    assert not marker.exists()


def test_a_deepspeed_zero0_model_file_with_a_payload_is_refused_unless_trusted(tmp_path, monkeypatch):
    """`simcot eval/export/decode` of a ZeRO-0 checkpoint read this file with weights_only=False."""
    (tmp_path / "deepspeed").mkdir()
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)},
               tmp_path / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: weights-only loading refused it"):
        load_weights(tmp_path)
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")  # the user's explicit word that the file is trusted
    assert torch.equal(load_weights(tmp_path)["w"], torch.ones(2)) and marker.exists()


def test_deepspeeds_own_loads_are_made_weights_only_and_restored(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "x.pt")
    real = torch.load
    with weights_only_loads(), pytest.raises(CheckpointError, match="x.pt"):
        torch.load(tmp_path / "x.pt", weights_only=False)  # what DeepSpeed's checkpoint engine calls
    assert torch.load is real and not marker.exists()


def test_damaged_checkpoint_files_are_named(tmp_path):
    engine = _engine(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'model.safetensors'}: damaged safetensors file"):
        load_weights(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors: damaged safetensors file"):
        engine.load(tmp_path)
    (tmp_path / "rng_rank0.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="rng_rank0.pt: not a readable PyTorch file"):
        load_rng_state(tmp_path, 0)


def test_no_source_file_loads_with_weights_only_false():
    hits = [f"{p.relative_to(REPO)}:{i}" for folder in ("train", "models", "kernels", "launchers", "benchmarks")
            for p in (REPO / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert hits == []
