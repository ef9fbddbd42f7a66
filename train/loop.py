"""The one training loop, shared by every method and every engine.

One optimizer step reads top to bottom: the global batch for this step is cut into micro-batches
(this rank's share, for every accumulation step) -> the method collates them -> the engine runs
the method's loss inside the model's forward -> backward -> one engine step -> the tracker.

The data order is a pure function of (seed, epoch), and a checkpoint stores the position inside
the epoch, so a resumed run replays exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from simcot.parallel import mean_across_ranks
from simcot.train.engines.checkpoint import save_checkpoint
from simcot.train.config import RunShape
from simcot.train.data.examples import Example
from simcot.train.engines.distributed import maybe_inject_fault
from simcot.train.evaluate import EvalResult, evaluate

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the optimizer step, so no weights are spoiled."""


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # the next step to run inside `epoch`
    mlflow_run_id: str = ""
    last_checkpoint: str = ""


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(order: list[int], step: int, batch_size: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of global step `step`: chunk j goes to rank j % world.

    The union over ranks is the same global batch whatever the world size, so a run gives the
    same result on 1 or N processes (up to reduction order).
    """
    batch = order[step * batch_size:(step + 1) * batch_size]
    chunks = [batch[i:i + micro] for i in range(0, batch_size, micro)]
    return chunks[rank::world]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # process peak RSS on Linux, in KiB
    return kb / 1024


class Trainer:
    def __init__(self, cfg, method, engine, tok, examples: dict[str, list[Example]], tracker, run_dir: Path,
                 config_yaml: str):
        self.cfg, self.method, self.engine, self.tok = cfg, method, engine, tok
        self.examples = examples
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.config_yaml = config_yaml
        t = cfg.train
        self.rank, self.world = engine.rank, engine.world_size
        shape = RunShape.of(t, self.world, len(examples["train"]))
        self.accum, self.steps_per_epoch, self.total_steps = shape.accum, shape.steps_per_epoch, shape.total_steps
        self.history: list[dict] = []  # per-step records (tests and summaries read them)

    # --------------------------------------------------------------------------------- steps

    def _device_batch(self, batch: dict) -> dict:
        dev = self.engine.device
        return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, state: TrainState, order: list[int]) -> dict[str, float]:
        t = self.cfg.train
        parts: dict[str, float] = {}
        loss_sum, tokens, samples = 0.0, 0, 0
        mbs = micro_batches(order, state.step_in_epoch, t.batch_size, t.micro_batch_size, self.rank, self.world)
        maybe_inject_fault(self.rank, state.global_step + 1)
        for j, idx in enumerate(mbs):
            chunk = j * self.world + self.rank  # the chunk's index in the global batch: same draw on any world size
            rng = random.Random(f"{t.seed}-{state.epoch}-{state.step_in_epoch}-{chunk}")
            batch = self.method.collate([self.examples["train"][i] for i in idx], state.epoch, rng)
            tokens += int(batch.pop("n_tokens"))
            samples += len(idx)
            out = self.engine.forward(self.method.loss, self._device_batch(batch))
            self.engine.backward(out.loss)
            loss_sum += float(out.loss.detach())
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0.0) + float(v) / len(mbs)
        metrics = mean_across_ranks({"loss": loss_sum / len(mbs), **parts})
        if not math.isfinite(metrics["loss"]):
            where = f"step {state.global_step + 1} (epoch {state.epoch}, batch {state.step_in_epoch})"
            detail = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            last = state.last_checkpoint or "none yet"
            raise NonFiniteLossError(f"non-finite loss at {where}: {detail}; the optimizer step was skipped and "
                                     f"the last checkpoint ({last}) is intact")
        metrics.update(self.engine.step())
        metrics["tokens"], metrics["samples"] = float(tokens * self.world), float(samples * self.world)
        return metrics

    # ---------------------------------------------------------------------------- the loop

    def fit(self, state: TrainState) -> TrainState:
        t = self.cfg.train
        progress = self._progress(state.global_step)
        window = {"tokens": 0.0, "samples": 0.0, "t0": time.perf_counter()}
        self.engine.module.train()
        done = state.global_step >= self.total_steps
        while not done and state.epoch < t.epochs:
            self._enter_epoch(state)
            order = epoch_order(len(self.examples["train"]), t.seed, state.epoch)
            while state.step_in_epoch < self.steps_per_epoch:
                m = self.train_step(state, order)
                state.global_step += 1
                state.step_in_epoch += 1
                window["tokens"] += m.pop("tokens")
                window["samples"] += m.pop("samples")
                self.history.append({"step": state.global_step, "epoch": state.epoch, **m})
                self._append_metrics(self.history[-1])
                if state.global_step % t.log_every == 0 or state.global_step == self.total_steps:
                    self._log_train(state, m, window, progress)
                if t.save_every and state.global_step % t.save_every == 0:
                    self.save(state)
                if state.global_step >= self.total_steps:
                    done = True
                    break
            if state.step_in_epoch >= self.steps_per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
                if t.eval_every and state.epoch % t.eval_every == 0 and not done:
                    self.run_eval("val", self.cfg.eval.n_val, state)
                if not t.save_every and not done:
                    self.save(state)
        if progress is not None:
            progress.close()
        if not state.last_checkpoint.endswith(f"step_{state.global_step:07d}"):
            self.save(state)
        return state

    def _append_metrics(self, record: dict) -> None:
        """Per-step metrics as JSONL in the run folder (a resumed run appends; the last line per step wins)."""
        if self.rank == 0:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _enter_epoch(self, state: TrainState) -> None:
        """The method's per-epoch settings (also on resuming mid-epoch): group learning rates, a fresh
        optimizer at a stage change, and whatever it prepares (SemCoT caches its targets)."""
        scales = self.method.lr_scales(state.epoch)
        if scales is not None:
            self.engine.set_lr_scales(scales)
        if state.step_in_epoch == 0 and state.epoch > 0 and self.method.reset_optimizer_at(state.epoch):
            log.info("epoch %d: fresh optimizer (stage %d)", state.epoch, self.method.stage(state.epoch))
            self.engine.reset_optimizer()
        self.method.before_epoch(self.engine, state.epoch, self.examples["train"])

    def _progress(self, initial: int):
        if self.rank != 0 or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=initial, desc="train", dynamic_ncols=True)

    def _log_train(self, state: TrainState, m: dict, window: dict, progress) -> None:
        dt = max(time.perf_counter() - window["t0"], 1e-9)
        m = dict(m, tokens_per_s=window["tokens"] / dt, samples_per_s=window["samples"] / dt,
                 epoch=float(state.epoch), stage=float(self.method.stage(state.epoch)),
                 peak_memory_mb=peak_memory_mb(self.engine.device))
        window.update(tokens=0.0, samples=0.0, t0=time.perf_counter())
        self.tracker.log_metrics({f"train/{k}": v for k, v in m.items()}, state.global_step)
        if self.rank != 0:
            return
        if progress is not None:
            progress.n = state.global_step
            progress.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=True)
        else:
            log.info("step %d/%d | epoch %d | loss %.4f | lr %.2e | %.0f tok/s", state.global_step,
                     self.total_steps, state.epoch, m["loss"], m["lr"], m["tokens_per_s"])

    # ------------------------------------------------------------------------- eval & save

    @staticmethod
    def trained_epoch(state: TrainState) -> int:
        """The last epoch the weights were trained in (what the curriculum stage is read from)."""
        return state.epoch - 1 if state.step_in_epoch == 0 and state.epoch > 0 else state.epoch

    def run_eval(self, split: str, cap: int, state: TrainState, final: bool = False,
                 n_latents: int | None = None, temperature: float | None = None) -> EvalResult:
        examples = self.examples[split][:cap] if cap > 0 else self.examples[split]
        with self.engine.eval_context():
            res = evaluate(self.engine.module, self.method, examples, self.tok, self.cfg.eval,
                           self.cfg.data.answer_prefix, split, self.engine.device,
                           epoch=self.trained_epoch(state), n_latents=n_latents, temperature=temperature)
        name = split if n_latents is None else f"{split}/latents_{n_latents}"
        if temperature is not None:
            name = f"{split}/temperature_{temperature:g}"
        self.tracker.log_metrics(res.summary(name), state.global_step)
        if self.rank == 0:
            log.info("%s accuracy %.4f (%d/%d) | %.1f samples/s", name, res.accuracy, res.correct, res.n,
                     res.samples_per_s)
            if final:
                suffix = "" if n_latents is None else f"_latents_{n_latents}"
                suffix += "" if temperature is None else f"_temperature_{temperature:g}"
                path = res.write(self.run_dir / f"predictions_{split}{suffix}.jsonl")
                self.tracker.log_artifact(path, "predictions")
        return res

    def save(self, state: TrainState) -> Path | None:
        if not self.cfg.train.save:
            return None
        state.last_checkpoint = str(self.run_dir / "checkpoints" / f"step_{state.global_step:07d}")
        path = save_checkpoint(self.run_dir, state.global_step, self.engine, self.tok, self.config_yaml,
                               asdict(state), keep=self.cfg.train.keep_checkpoints, is_writer=self.rank == 0)
        self.tracker.set_tags({"simcot.checkpoint": str(path.resolve())})
        return path
