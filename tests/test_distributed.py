"""Multi-process training on CPU (gloo), launched as users launch it: torchrun and the deepspeed launcher.

Tolerances: per-step losses of 1 and 2 processes agree to 1e-5 relative (the same micro-batches,
summed in a different order); a resumed run matches its uninterrupted twin to 1e-6.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")


def _port() -> int:
    from simcot.train.engines.distributed import free_port

    return free_port()


def _env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SIMCOT_DATA_DIR=str(SHARED_DATA),
               PYTHONUNBUFFERED="1", **extra)
    env.pop("SIMCOT_FAIL_AT", None)
    env.pop("SIMCOT_KILL_AT", None)
    env.update(extra)
    return env


def _args(tmp_path, name, **extra) -> list[str]:
    ov = {"method": "coconut", "coconut.max_latent_stage": 2, "coconut.uniform_prob": 0.5,  # ragged latents per rank
          "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.vocab_size": 300,
          "data.n_train": 96, "data.n_val": 8, "data.n_test": 12, "data.steps": 2, "data.min_steps": 1,
          "train.out_dir": str(tmp_path / "runs"), "train.run_name": name, "train.epochs": 2,
          "train.batch_size": 16, "train.micro_batch_size": 4, "train.lr": 3e-3, "train.warmup_steps": 2,
          "train.log_every": 1, "eval.batch_size": 4, "eval.max_new_tokens": 12, "tracking.enabled": False,
          "deepspeed.enabled": True}
    ov.update(extra)
    return ["train"] + [f"--{k}={v}" for k, v in ov.items()]


def torchrun(tmp_path, name, nproc, timeout=400, check=True, env=None, **extra):
    # `python -m torch.distributed.run`, not bin/torchrun: a worktree's venv scripts may point at another checkout's python
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_port()),
           "-m", "simcot.launchers.cli", *_args(tmp_path, name, **extra)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=tmp_path)
    if check and p.returncode:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def losses(tmp_path, name) -> dict[int, float]:
    out = {}
    for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def same_losses(tmp_path, a: str, b: str, steps: int) -> dict[int, float]:
    """Runs `a` and `b` logged `steps` steps with the same losses (1e-5 relative); returns a's."""
    la, lb = losses(tmp_path, a), losses(tmp_path, b)
    assert len(la) == len(lb) == steps
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5), step
    return la


def predictions(tmp_path, name) -> list[str]:
    path = tmp_path / "runs" / name / "predictions_test.jsonl"
    return [json.loads(l)["generated"] for l in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, stage):
    torchrun(tmp_path, "one", 1, **{"deepspeed.zero_stage": stage})
    run_two = torchrun(tmp_path, "two", 2, **{"deepspeed.zero_stage": stage})
    if stage == 3:  # evaluation gathered the weights once and no module hook partitioned them mid-way
        assert "ZeRO-3 evaluation ran on weights gathered once" in run_two.stderr
        assert "partitioned again during evaluation" not in run_two.stderr
    same_losses(tmp_path, "one", "two", 12)
    assert predictions(tmp_path, "one") == predictions(tmp_path, "two")  # sharded eval gathers in order
    assert len(predictions(tmp_path, "two")) == 12
    if stage == 3:  # without the one-time gather every eval forward all-gathers: ranks must stay in step
        torchrun(tmp_path, "nogather", 2, **{"deepspeed.zero_stage": 3, "deepspeed.gather_for_eval": False})
        assert predictions(tmp_path, "nogather") == predictions(tmp_path, "two")


def test_killed_two_process_run_resumes_with_the_same_losses(tmp_path):
    extra = {"deepspeed.zero_stage": 3, "train.epochs": 6, "train.save_every": 4, "data.n_test": 0, "data.n_val": 0}
    torchrun(tmp_path, "full", 2, **extra)
    full = losses(tmp_path, "full")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "simcot.launchers.cli", *_args(tmp_path, "killed", **extra)]
    # the ranks SIGKILL themselves at step 10, after the step-8 checkpoint (a crash at a known step)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(SIMCOT_KILL_AT="10"),
                          cwd=tmp_path, start_new_session=True, timeout=400)
    assert proc.returncode != 0
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000008" and not (ckpts / "step_0000012").exists()
    assert max(losses(tmp_path, "killed")) == 9  # step 10 never finished
    resumed = torchrun(tmp_path, "killed", 2, **extra, **{"train.resume": str(tmp_path / "runs" / "killed")})
    assert "resumed from" in resumed.stderr
    got = losses(tmp_path, "killed")
    assert sorted(got) == list(range(1, 37))
    for step in range(1, 37):
        assert got[step] == pytest.approx(full[step], rel=1e-6), step


def test_a_failing_rank_ends_the_job_quickly_and_loudly(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    t0 = time.time()
    p = torchrun(tmp_path, "fail", 2, check=False, env=_env(SIMCOT_FAIL_AT="1:3"),
                 **{"deepspeed.zero_stage": 3, "tracking.enabled": True, "tracking.uri": uri})
    assert p.returncode != 0
    assert time.time() - t0 < 180
    assert "simcot: rank 1 failed: RuntimeError: injected failure (SIMCOT_FAIL_AT=1:3)" in p.stderr
    client = MlflowClient(uri)  # rank 0 knew which rank died: FAILED naming it, not KILLED
    (run,) = client.search_runs([client.get_experiment_by_name("simcot").experiment_id])
    assert run.info.status == "FAILED", p.stderr[-3000:]
    assert run.data.tags["simcot.error"] == "rank 1 failed: RuntimeError: injected failure (SIMCOT_FAIL_AT=1:3)"


def test_zero3_checkpoint_exports_to_a_model_that_evaluates_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    from simcot.train.export import export
    from simcot.train.runner import load_checkpoint_model
    from simcot.train.evaluate import evaluate

    torchrun(tmp_path, "z3", 2, **{"deepspeed.zero_stage": 3, "method": "codi", "codi.n_latents": 2})
    ckpt = tmp_path / "runs" / "z3"
    out = export(ckpt, tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.get_input_embeddings().weight.shape[0] > 256
    cfg, built, dev = load_checkpoint_model(out)  # the export, with CODI's projection beside it
    assert built.model.projection is not None
    res = evaluate(built.model, built.method, built.examples["test"], built.tok, cfg.eval, cfg.data.answer_prefix,
                   "test", dev, epoch=1)
    assert [p["generated"] for p in res.predictions] == predictions(tmp_path, "z3")
    bf16 = export(ckpt, tmp_path / "hf16")
    assert str(AutoModelForCausalLM.from_pretrained(str(bf16)).dtype) == "torch.bfloat16"


def test_two_nodes_on_loopback_with_the_deepspeed_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = _port()
    procs = []
    for rank in (0, 1):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "1",
               "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--module", "simcot.launchers.cli",
               *_args(tmp_path, "nodes", **{"deepspeed.zero_stage": 3, "train.max_steps": 1, "data.n_test": 0,
                                            "data.n_val": 0})]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=_env(), cwd=tmp_path))
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert '"steps": 1,' in outs[0][0]  # rank 0 (on node 0) prints the run's summary
    assert list(losses(tmp_path, "nodes")) == [1]
    assert (tmp_path / "runs" / "nodes" / "checkpoints" / "step_0000001" / "deepspeed").is_dir()


def test_semcot_under_zero3_two_processes_match_one(tmp_path):
    """SemCoT's frozen answerer, phase-scaled lr groups and cached targets under ZeRO-3 sharding."""
    torchrun(tmp_path, "cot", 1, **{"method": "cot", "train.epochs": 1, "deepspeed.enabled": False})
    sem = {"method": "semcot", "train.init_from": str(tmp_path / "runs" / "cot"), "deepspeed.zero_stage": 3,
           "semcot.n_thoughts": 2, "semcot.encoder_dim": 8, "semcot.generator": "truncate:1",
           "semcot.encoder_layers": "1:2", "semcot.encoder_proj_epochs": 1, "semcot.encoder_epochs": 1,
           "semcot.generator_proj_epochs": 1, "train.epochs": 4, "train.schedule": "constant"}
    torchrun(tmp_path, "one", 1, **sem)
    torchrun(tmp_path, "two", 2, **sem)
    one = same_losses(tmp_path, "one", "two", 24)
    assert predictions(tmp_path, "one") == predictions(tmp_path, "two")
    # the same initial weights as without DeepSpeed (the <thought> vector is the mean of a gathered table,
    # not of an empty shard), so the first step's loss agrees; the optimizers differ after it
    torchrun(tmp_path, "plain", 1, **{**sem, "deepspeed.enabled": False, "train.max_steps": 1})
    assert losses(tmp_path, "plain")[1] == pytest.approx(one[1], rel=1e-6)


@pytest.mark.parametrize("decoder", ["copy", "shared"])
def test_simcot_decoders_under_zero3_two_processes_match_one(tmp_path, decoder):
    """The copy decoder is filled parameter by parameter into partitioned modules; the shared one is
    hooks on the main model's linears: both must give the 1-process losses on 2 ranks."""
    extra = {"method": "simcot-coconut", "simcot.decoder": decoder, "deepspeed.zero_stage": 3, "train.epochs": 1}
    torchrun(tmp_path, "one", 1, **extra)
    torchrun(tmp_path, "two", 2, **extra)
    same_losses(tmp_path, "one", "two", 6)


def test_a_stale_extension_build_lock_is_named_before_deepspeed_starts(tmp_path, monkeypatch, capsys):
    """A process killed while it JIT-built a DeepSpeed op leaves torch's build lock behind, and the
    next DeepSpeed start waits on it forever, silently. init_distributed names it first (path and
    age), and leaves a fresh lock (a build running now) alone."""
    import types

    import torch.distributed as dist

    from simcot.train.config import Config
    from simcot.train.engines import distributed

    old, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    stamp = time.time() - 3600
    os.utime(old, (stamp, stamp))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    started = []
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(init_distributed=lambda **kw: started.append(
        capsys.readouterr().err)))  # what was said before DeepSpeed started
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    cfg = Config()
    cfg.deepspeed.enabled = True
    distributed.init_distributed(cfg)
    assert started == [f"simcot: warning: {old} is 60 minutes old: a build of the torch extension 'deepspeed_shm_comm' "
                       "was killed while holding it, and DeepSpeed waits on it forever when it builds that op; delete "
                       "the file if no build is running\n"]
    assert distributed.warn_stale_build_locks(now=time.time() + 3600) == [fresh, old]  # an hour on, both are
