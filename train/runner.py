"""Running a run: the assembled model and method (``assemble.build``) -> engine -> tracker -> loop.

``run_training`` is what ``simcot train`` calls; ``run_evaluation`` is ``simcot eval``. Both end
their MLflow run through ``tracking.tracker.tracked``: FAILED when something raises (KILLED on
Ctrl-C / SIGTERM), and re-raise; training adds its multi-rank rule (``_record_failure``).
"""

from __future__ import annotations

import functools
import logging
import platform
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch

from simcot.parallel import gather_objects
from simcot.train.assemble import (Built, apply_threads, build, load_checkpoint_config, load_checkpoint_model,
                                   resolve_device)
from simcot.train.engines.checkpoint import load_rng_state, load_trainer_state, resolve_checkpoint
from simcot.train.config import Config, ConfigError, RunShape, dump_yaml, flatten, to_dict
from simcot.train.decode_latents import decode_examples
from simcot.train.engines.distributed import init_distributed, uses_deepspeed
from simcot.train.engines.ds_engine import DeepSpeedEngine, build_ds_config, zero3_enabled
from simcot.train.engines.engine import TorchEngine
from simcot.train.loop import Trainer, TrainState
from simcot.train.model_source import check_model_source
from simcot.train.tracking.tracker import end_failed, make_tracker, tracked

log = logging.getLogger("simcot")


def setup_logging(rank: int = 0) -> None:
    import datasets

    datasets.disable_progress_bars()
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_name(cfg: Config) -> str:
    # the second alone does not tell two runs apart (a sweep, two shells): a random suffix does
    return (f"{cfg.method}-{Path(cfg.model.name).name}-{cfg.data.source}-{time.strftime('%Y%m%d-%H%M%S')}"
            f"-{secrets.token_hex(3)}")


def claim_run_dir(cfg: Config) -> str:
    """Create a new run's folder, exclusively: a run folder belongs to one run. Returns its name.

    A default name that another run took in the meantime is drawn again; a named folder that
    exists is refused (resume it, name another, or replace it with train.overwrite)."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.train.run_name:
        for _ in range(100):
            name = default_run_name(cfg)
            try:
                (out / name).mkdir()
                return name
            except FileExistsError:
                continue
        raise ConfigError(f"could not create a new run folder in {out}")
    run_dir = out / cfg.train.run_name
    if cfg.train.overwrite and run_dir.exists():
        if not _looks_like_a_run(run_dir):
            raise ConfigError(f"train.overwrite: {run_dir} does not look like a run folder (no checkpoints/, "
                              f"metrics.jsonl or tokenizer/); not deleting it")
        log.warning("train.overwrite: deleting the existing run folder %s", run_dir)
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise ConfigError(f"run folder {run_dir} already exists (another run's): resume it with --train.resume "
                          f"{run_dir}, choose another --train.run_name, or replace it with --train.overwrite true"
                          ) from None
    return cfg.train.run_name


def git_info() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return {"git.commit": sha.stdout.strip(), "git.dirty": str(bool(dirty.stdout.strip()))}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git.commit": "unknown", "git.dirty": "unknown"}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"version.python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed", "triton", "datasets", "mlflow", "simcot"):
        try:
            out[f"version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            out[f"version.{pkg}"] = "absent"
    return out


def _run_params(cfg: Config, built: Built, world: int) -> dict[str, str]:
    params = {k: v for k, v in flatten(to_dict(cfg)).items()}
    params.update({"world_size": world, "global_batch_size": cfg.train.batch_size,
                   "grad_accumulation": RunShape.accumulation(cfg.train, world)})
    for split, n in built.splits.sizes().items():
        params[f"data.{split}_rows"] = n
        params[f"data.{split}_examples"] = len(built.examples[split])
    for split, h in built.splits.hashes().items():
        params[f"data.{split}_hash"] = h
    for split, where in built.splits.origin.items():  # a local file, a URL or `<hub id>[<split>]`
        params[f"data.{split}_origin"] = where
    params["model.parameters"] = sum(p.numel() for p in built.model.lm.parameters())
    params["model.actual_vocab_size"] = len(built.tok)  # model.vocab_size is the config's (soft) target
    params.update(versions())
    params.update(git_info())
    return params


def _tags(cfg: Config, method, ds_config: dict | None = None, hosts: int = 1) -> dict[str, str]:
    n = method.eval_latents(max(cfg.train.epochs - 1, 0))
    return {"method": cfg.method, "model": cfg.model.name, "dataset": cfg.data.source, "n_latents": str(n),
            "zero_stage": str(ds_config["zero_optimization"]["stage"]) if ds_config else "none", "hosts": str(hosts)}


def latent_sweep(cfg: Config) -> list[int]:
    return [int(k) for k in cfg.eval.latent_sweep.split(",") if k.strip()]


def _on_sigterm(signum, frame):  # launchers stop surviving ranks with SIGTERM: record the run as KILLED
    raise KeyboardInterrupt(f"signal {signum}")


def _looks_like_a_run(path: Path) -> bool:
    """What train.overwrite may delete: a folder a run wrote (or an empty one), never another folder
    that a mistyped run name (``..``, a path) happens to reach."""
    if not path.is_dir() or path.resolve() in (Path.cwd().resolve(), Path.home().resolve()):
        return False
    return not any(path.iterdir()) or any((path / n).exists() for n in ("checkpoints", "metrics.jsonl", "tokenizer"))


def _resolve_run(cfg: Config, overrides: dict | None, is_main: bool = True
                 ) -> tuple[Config, TrainState, Path | None, Path]:
    """(config, state, checkpoint to resume or None, run folder). A new run's folder is created
    here (by rank 0, which names it for every rank); a resumed run keeps its saved config, only
    the overrides given now are applied on top."""
    if not cfg.train.resume:
        claimed: tuple[str, str] = ("", "")
        if is_main:
            try:
                claimed = (claim_run_dir(cfg), "")
            except ConfigError as e:
                claimed = ("", str(e))
        name, error = gather_objects(claimed)[0]
        if error:  # every rank stops with rank 0's reason
            raise ConfigError(error)
        cfg.train.run_name = name
        return cfg, TrainState(), None, Path(cfg.train.out_dir) / name
    ckpt = resolve_checkpoint(_resume_target(cfg))
    saved = load_checkpoint_config(ckpt, {k: v for k, v in (overrides or {}).items() if k != "train.resume"})
    saved.train.resume = cfg.train.resume
    run_dir = ckpt.parent.parent
    saved.train.run_name = run_dir.name
    return saved, TrainState(**load_trainer_state(ckpt)), ckpt, run_dir


def _device(cfg: Config, info) -> torch.device:
    device = resolve_device(cfg.train.device)
    return torch.device("cuda", info.local_rank) if device.type == "cuda" and info.world > 1 else device


def _final_evaluation(cfg: Config, built: Built, trainer: Trainer, state: TrainState) -> tuple[dict, dict]:
    """Val and test (and each latent count of eval.latent_sweep): (results, metrics by name)."""
    results, metrics = {}, {}
    for split, cap in (("val", cfg.eval.n_val), ("test", cfg.eval.n_test)):
        if not built.examples[split]:
            continue
        results[split] = trainer.run_eval(split, cap, state, final=True)
        metrics.update(results[split].summary())
        for k in latent_sweep(cfg) if built.method.uses_latents else []:
            results[f"{split}_latents_{k}"] = r = trainer.run_eval(split, cap, state, final=True, n_latents=k)
            metrics.update(r.summary(f"{split}/latents_{k}"))
        for temp in [float(x) for x in cfg.eval.temperature_sweep.split(",") if x.strip()]:  # sampled, not greedy
            results[f"{split}_temperature_{temp:g}"] = r = trainer.run_eval(split, cap, state, final=True,
                                                                             temperature=temp)
            metrics.update(r.summary(f"{split}/temperature_{temp:g}"))
    return results, metrics


def _log_decoded_latents(built: Built, engine, tracker, state: TrainState) -> None:
    """SIM-CoT: what the step decoder reads out of the latents of 20 test questions."""
    if not hasattr(built.method, "decode_slots") or not built.examples["test"] or engine.world_size > 1:
        return
    with engine.eval_context():
        rows = decode_examples(engine.module, built.method, built.tok, built.examples["test"][:20],
                               Trainer.trained_epoch(state), built.cfg.eval.max_new_tokens, engine.device)
    tracker.log_jsonl(rows, "decoded_latents/test.jsonl")


def run_training(cfg: Config, overrides: dict | None = None) -> dict:
    """Train (or resume) a run, evaluate it on val and test, and return a summary."""
    import signal

    info = init_distributed(cfg)
    setup_logging(info.rank)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    if not cfg.train.resume:  # before any data is generated or folder made
        check_model_source(cfg.model)
    cfg, state, resume_ckpt, run_dir = _resolve_run(cfg, overrides, info.is_main)
    try:
        return _train(cfg, info, state, resume_ckpt, run_dir)
    except BaseException:
        if info.is_main and resume_ckpt is None and not any((run_dir / n).exists()
                                                              for n in ("metrics.jsonl", "checkpoints")):
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before its first step: the name stays free
        raise


def _train(cfg: Config, info, state: TrainState, resume_ckpt: Path | None, run_dir: Path) -> dict:
    t = cfg.train
    apply_threads(t.threads)
    _rank_failure(run_dir, info.rank).unlink(missing_ok=True)  # left by an earlier attempt of this run
    seed_everything(t.seed)
    device = _device(cfg, info)
    accum = RunShape.accumulation(t, info.world)  # the DeepSpeed config needs it before the model is built
    ds_config, hf_ds_config = None, None
    if uses_deepspeed(cfg):
        ds_config = build_ds_config(cfg, info.world, accum, on_cpu=device.type == "cpu")
        if zero3_enabled(ds_config):  # must exist (and stay alive) before any model is built
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(ds_config)

    init_ckpt = resolve_checkpoint(t.init_from) if t.init_from else None
    built = build(cfg, run_dir, checkpoint=resume_ckpt, init_from=init_ckpt)
    shape = RunShape.of(t, info.world, len(built.examples["train"]))
    args = (built.model, cfg, shape.total_steps, device, shape.accum, built.method.param_groups)
    engine = DeepSpeedEngine(*args, ds_config=ds_config) if ds_config is not None else TorchEngine(*args)
    if resume_ckpt is not None:
        engine.load(resume_ckpt)
        load_rng_state(resume_ckpt, engine.rank)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_ckpt, state.global_step, state.epoch,
                 state.step_in_epoch)

    tracker = make_tracker(cfg.tracking, t.run_name, engine.rank, run_id=state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id
    config_yaml = dump_yaml(cfg)
    with tracked(tracker, on_error=functools.partial(_record_failure, run_dir, info)):
        hosts = len(set(gather_objects(platform.node())))
        if resume_ckpt is None:
            tracker.log_params(_run_params(cfg, built, info.world))
            tracker.set_tags(_tags(cfg, built.method, ds_config, hosts))
            tracker.log_text(config_yaml, "config.yaml")
        # where the checkpoints live (simcot.checkpoint, set at every save, names the newest)
        tracker.set_tags({"simcot.run_dir": str(run_dir.resolve()), "simcot.host": socket.gethostname(),
                          "simcot.role": "train"})
        trainer = Trainer(cfg, built.method, engine, built.tok, built.examples, tracker, run_dir, config_yaml)
        t0 = time.perf_counter()
        state = trainer.fit(state)
        train_seconds = time.perf_counter() - t0
        results, final_metrics = _final_evaluation(cfg, built, trainer, state)
        _log_decoded_latents(built, engine, tracker, state)
        tracker.log_metrics({"train/seconds": train_seconds}, state.global_step)
        tracker.log_run_plots()
    del hf_ds_config  # kept alive until here: transformers reads it while models are built and saved
    return {"run_dir": str(run_dir), "run_id": tracker.run_id, "tracking_uri": getattr(tracker, "uri", ""),
            "steps": state.global_step, "train_seconds": train_seconds, "checkpoint": state.last_checkpoint,
            "final_loss": trainer.history[-1]["loss"] if trainer.history else float("nan"),
            **{f"{s}_accuracy": r.accuracy for s, r in results.items()},
            **{f"{s}_samples_per_s": r.samples_per_s for s, r in results.items()},
            "metrics": final_metrics}


def _rank_failure(run_dir: Path, rank: int) -> Path:
    return run_dir / f".rank{rank}.failed"


def _record_failure(run_dir: Path, info, tracker, err: BaseException) -> None:
    """Mark the MLflow run FAILED (KILLED on Ctrl-C / SIGTERM) with the cause.

    A rank other than 0 leaves its error in the run folder before it exits; rank 0, stopped by
    the launcher (SIGTERM) or by a broken collective, finds it there (one host, or a shared
    filesystem) and marks the run FAILED naming that rank instead of KILLED."""
    if not info.is_main:
        try:
            _rank_failure(run_dir, info.rank).write_text(f"{type(err).__name__}: {err}"[:5000])
        except OSError:
            pass
        return
    with _sigterm_held():
        _record_on_main(run_dir, info, tracker, err)


def _sigterm_held():
    """The launcher's SIGTERM (sent when a peer dies) must not cut the run's record short: it is
    ignored while rank 0 writes it (the launcher still SIGKILLs after its grace period)."""
    import contextlib
    import signal

    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    return held()


def _record_on_main(run_dir: Path, info, tracker, err: BaseException) -> None:
    failed = sorted(run_dir.glob(".rank*.failed"))
    for _ in range(20 if info.world > 1 and not failed else 0):  # a peer may still be writing its cause
        time.sleep(0.1)
        failed = sorted(run_dir.glob(".rank*.failed"))
    if failed:
        rank = failed[0].name.split(".")[1][4:]
        tracker.set_tags({"simcot.error": f"rank {rank} failed: {failed[0].read_text()}"[:5000],
                          "simcot.failed_rank": rank})
        tracker.finish("FAILED")
    else:
        end_failed(tracker, err, plots=True)


def _resume_target(cfg: Config) -> str:
    if cfg.train.resume != "auto":
        return cfg.train.resume
    if not cfg.train.run_name:
        raise ValueError("train.resume=auto needs train.run_name to find the run folder")
    return str(Path(cfg.train.out_dir) / cfg.train.run_name)


def run_evaluation(checkpoint: str | Path, overrides: dict | None = None, out: str = "") -> dict:
    """Evaluate a checkpoint on one split; logs a new MLflow run tagged with the training run."""
    from simcot.train.evaluate import evaluate

    setup_logging()
    ckpt = resolve_checkpoint(checkpoint)
    cfg, built, dev = load_checkpoint_model(ckpt, overrides)
    split = cfg.eval.split
    cap = {"val": cfg.eval.n_val, "test": cfg.eval.n_test}.get(split, 0)
    examples = built.examples[split][:cap] if cap > 0 else built.examples[split]
    if not examples:
        raise ValueError(f"split '{split}' of source '{cfg.data.source}' is empty")
    trained = load_trainer_state(ckpt)
    tracker = make_tracker(cfg.tracking, f"eval-{cfg.train.run_name}-{split}")
    with tracked(tracker):
        tracker.set_tags({**_tags(cfg, built.method), "simcot.role": "eval",
                          "simcot.eval_of": trained.get("mlflow_run_id", ""),
                          "simcot.checkpoint": str(ckpt.resolve())})
        tracker.log_params({k: v for k, v in flatten(to_dict(cfg)).items() if k.startswith(("eval.", "data."))})
        res = evaluate(built.model, built.method, examples, built.tok, cfg.eval, cfg.data.answer_prefix, split, dev,
                       epoch=trained.get("epoch"))
        tracker.log_metrics(res.summary(), trained.get("global_step", 0))
        path = res.write(Path(out) if out else ckpt / f"predictions_{split}.jsonl")
        tracker.log_artifact(path, "predictions")
    log.info("%s accuracy %.4f (%d/%d), %.1f samples/s -> %s", split, res.accuracy, res.correct, res.n,
             res.samples_per_s, path)
    return {"split": split, "accuracy": res.accuracy, "n": res.n, "samples_per_s": res.samples_per_s,
            "predictions": str(path), "run_id": tracker.run_id}
