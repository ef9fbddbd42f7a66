"""Recipes, the memory planner and the launcher lines."""

from pathlib import Path

import pytest

from simcot.launchers.launch import launcher_line
from simcot.launchers.plan import make_plan
from simcot.train.config import load_config
from simcot.train.sweep import METHODS, SweepConfig

ALL_RECIPES = sorted((Path(__file__).resolve().parents[1] / "launchers" / "recipes").glob("*.yaml"))
SWEEPS = [p for p in ALL_RECIPES if p.stem.startswith("sweep-")]
RECIPES = [p for p in ALL_RECIPES if p not in SWEEPS]


def test_every_sweep_recipe_builds_a_valid_config_for_every_method():
    assert len(SWEEPS) >= 2
    for path in SWEEPS:
        spec = SweepConfig.load(str(path))
        for m in METHODS:
            assert spec.build({}, m, {"method": m}).method == m


def test_every_recipe_is_a_valid_config_and_chains_by_run_name():
    assert len(RECIPES) >= 20
    names = {p.stem for p in RECIPES}
    for path in RECIPES:
        cfg = load_config(path)
        assert cfg.train.run_name == path.stem
        assert cfg.train.batch_size % cfg.train.micro_batch_size == 0
        if cfg.train.init_from:  # e.g. coconut-gpt2 starts from runs/cot-gpt2
            assert Path(cfg.train.init_from).name in names, path.name


def test_plan_matches_deepspeeds_estimates_for_8b():
    # The reference figures (fused-loss-and-zero3.md): ZeRO-3 model states of LLaMA-3.1-8B are
    # 146.6 GB on 1 GPU and 20.2 GB per GPU on 8 (= 136.6 / 18.8 GiB).
    one = make_plan("llama-3.1-8b", gpus=1, zero=3, method="cot")
    eight = make_plan("llama-3.1-8b", gpus=8, zero=3, method="cot")
    assert one.params == 8_030_261_248 and one.largest_layer == 128256 * 4096
    assert one.gpu_model_states_gib == pytest.approx(136.6, abs=0.1)
    assert eight.gpu_model_states_gib == pytest.approx(18.8, abs=0.1)
    assert not one.fits and eight.fits
    off = make_plan("llama-3.1-8b", gpus=1, zero=3, offload="optimizer", method="cot")
    assert off.gpu_model_states_gib < 20 and off.cpu_model_states_gib_per_node > 150


def test_plan_counts_lora_decoder_copies_and_latents():
    full = make_plan("llama-3.2-1b", gpus=8, zero=3, method="simcot-codi", decoder="copy")
    shared = make_plan("llama-3.2-1b", gpus=8, zero=3, method="simcot-codi", decoder="shared")
    lora = make_plan("llama-3.2-1b", gpus=8, zero=3, method="codi", lora=128)
    # a full decoder copy adds its own parameters, gradients and Adam states: 18 bytes/param over 8 GPUs
    extra = full.gpu_model_states_gib - shared.gpu_model_states_gib
    assert extra == pytest.approx(18 * full.params / 8 / 2**30, rel=1e-3)
    assert lora.trainable < 0.2 * lora.params and lora.gpu_model_states_gib < shared.gpu_model_states_gib
    few = make_plan("llama-3.2-1b", method="coconut", n_latents=2)
    many = make_plan("llama-3.2-1b", method="coconut", n_latents=16)
    assert many.activations_gib > few.activations_gib
    with pytest.raises(ValueError, match="--offload all .* needs --zero 3"):
        make_plan("gpt2", zero=2, offload="all")


def test_launcher_lines():
    ds = launcher_line("r.yaml", "deepspeed", gpus=8, nodes=2, hostfile="hosts", overrides={"train.lr": 1e-4})
    assert ds[:5] == ["deepspeed", "--hostfile", "hosts", "--num_nodes", "2"]
    assert ds[-6:] == ["--module", "simcot.launchers.cli", "train", "--config", "r.yaml", "--train.lr=0.0001"]
    tr = launcher_line("r.yaml", "torchrun", gpus=4, nodes=2, node_rank=1, master_addr="10.0.0.1")
    assert tr[:11] == ["torchrun", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1", "--master_addr",
                       "10.0.0.1", "--master_port", "29500"]
    sl = launcher_line("r.yaml", "slurm", gpus=8, nodes=4)
    assert sl[:3] == ["sbatch", "--nodes=4", "--gpus-per-node=8"] and sl[3].endswith("slurm/train.sbatch")
    assert "--no_ssh" in launcher_line("r.yaml", "deepspeed", no_ssh=True, node_rank=1)
