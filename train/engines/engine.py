"""The engine owns the model's optimisation: optimizer, schedule, precision, accumulation, and
the model/optimizer half of a checkpoint.

``TorchEngine`` is plain PyTorch (one process, CPU or one GPU). The DeepSpeed engine keeps the
same contract, written down once in :class:`Engine`, so the loop never knows which it drives.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import save_model

from simcot.train.engines.checkpoint import load_safetensors, load_state_strict, safe_load
from simcot.train.config import Config, TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_lambda(tcfg: TrainConfig, total_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then cosine/linear/constant."""
    warmup = int(tcfg.warmup_ratio * total_steps) if tcfg.warmup_ratio > 0 else tcfg.warmup_steps
    warmup = min(warmup, max(total_steps - 1, 0))
    floor = tcfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tcfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if tcfg.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and 1-D parameters are not decayed (as nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_lambdas(groups: list[dict], tcfg: TrainConfig, total_steps: int, scales: dict[str, float]) -> list:
    """One lr multiplier per parameter group: the schedule times the group's scale.

    A method names its groups (SemCoT: one per part it trains in turn) and sets ``scales`` per
    epoch; a scale of 0 freezes a group exactly (no step, no weight decay). Unnamed groups: 1."""
    base = lr_lambda(tcfg, total_steps)
    return [lambda step, name=g.get("name"): base(step) * scales.get(name, 1.0) for g in groups]


def refresh_lrs(scheduler) -> None:
    """Apply changed group scales now rather than at the next scheduler step."""
    for group, f in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = group["initial_lr"] * f(scheduler.last_epoch)


class Engine:
    """What the loop, the runner and evaluation use of an engine; ``TorchEngine`` and
    ``DeepSpeedEngine`` (train/engines/ds_engine.py) implement it.

    Both are built alike, ``(model, cfg, total_steps, device, accum, groups_fn)``: `cfg` is
    the run's Config (``train.*``: optimizer, schedule, precision, clipping; DeepSpeed also reads
    ``deepspeed.*``), `total_steps` the schedule's length (RunShape.total_steps), `accum`
    micro-batches per optimizer step on this rank (RunShape.accum), `groups_fn(model,
    weight_decay)` the method's parameter groups. DeepSpeed's engine also takes the run's
    ds_config (keyword), which exists before the model does (ZeRO-3 builds the model partitioned).

    A step is ``forward`` -> ``backward`` per micro-batch, then ``step`` after `accum` of them.
    Each parameter group's lr is the schedule's times its ``lr_scales`` entry (``set_lr_scales``;
    unnamed groups: 1), and the engine owns the model/optimizer half of a checkpoint.
    """

    module: torch.nn.Module  # the model being trained (LatentLM), on `device`
    device: torch.device
    rank: int  # this process's rank and the number of ranks
    world_size: int
    accum: int  # micro-batches per optimizer step on this rank (RunShape.accum)
    scheduler: torch.optim.lr_scheduler.LambdaLR  # one lr multiplier per group: schedule x lr_scales
    lr_scales: dict[str, float]  # per named parameter group, read by the scheduler's lambdas

    def __init__(self, cfg: Config, total_steps: int, device: torch.device, accum: int, groups_fn=param_groups):
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = device
        self.accum = accum
        self.groups_fn = groups_fn
        self.lr_scales = {}

    def _schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The lr schedule of `optimizer`'s groups, each scaled by its ``lr_scales`` entry."""
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, group_lambdas(optimizer.param_groups, self.cfg.train, self.total_steps, self.lr_scales))

    def forward(self, fn, *args):
        """``module(fn, *args)`` under the engine's precision (the method's loss as `fn`)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (scaled by 1/accum)."""
        raise NotImplementedError

    def step(self) -> dict[str, float]:
        """The optimizer step after `accum` backwards: clip, update, schedule; {'grad_norm', 'lr'}."""
        raise NotImplementedError

    def reset_optimizer(self) -> None:
        """Fresh optimizer moments (Coconut's stage changes); the schedule keeps its position."""
        raise NotImplementedError

    def set_lr_scales(self, scales: dict[str, float]) -> None:
        """Scale named parameter groups' lr from now on (0 freezes a group exactly)."""
        self.lr_scales.clear()
        self.lr_scales.update(scales)
        refresh_lrs(self.scheduler)

    def eval_context(self):
        """A context for no-grad evaluation passes (ZeRO-3 gathers the model once in it)."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """The model/optimizer half of a checkpoint, into folder `path`."""
        raise NotImplementedError

    def load(self, path: Path, weights_only: bool = False) -> None:
        """What `save` wrote (only the weights with `weights_only`)."""
        raise NotImplementedError


class TorchEngine(Engine):
    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int, device: torch.device,
                 accum: int, groups_fn=param_groups):
        super().__init__(cfg, total_steps, device, accum, groups_fn)
        self.module = model.to(device)
        t = cfg.train
        dtype = DTYPES[t.precision]
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        fused = self.device.type == "cuda"
        groups = self.groups_fn(self.module, t.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
        self.scheduler = self._schedule(self.optimizer)

    def reset_optimizer(self) -> None:
        """A fresh AdamW (Coconut resets it at stage changes); the schedule keeps its position."""
        sched_state = self.scheduler.state_dict()
        self._build_optimizer()
        self.scheduler.load_state_dict(sched_state)
        refresh_lrs(self.scheduler)

    def eval_context(self):
        return contextlib.nullcontext()

    def forward(self, fn, *args):
        with self.autocast:
            return self.module(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> dict[str, float]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = max(self.scheduler.get_last_lr())  # groups a method scales to 0 are frozen: report the live one
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr}

    def save(self, path: Path) -> None:
        save_model(self.module, str(path / "model.safetensors"))
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, path / "optimizer.pt")

    def load(self, path: Path, weights_only: bool = False) -> None:
        load_state_strict(self.module, load_safetensors(path / "model.safetensors"), f"checkpoint {path}")
        if weights_only:
            return
        state = safe_load(path / "optimizer.pt", map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
