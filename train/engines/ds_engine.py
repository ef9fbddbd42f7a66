"""The DeepSpeed engine: ZeRO 0-3, offload, bf16/fp16, from one CPU process to many nodes.

It offers the same calls as ``TorchEngine``. One ds_config is built from the simcot config (or a
user's JSON / a template in ``launchers/ds_configs`` with its "auto" values filled in): the global
batch comes from ``train.batch_size`` and accumulation from world size x micro-batch, so a run
means the same thing on 1 or 64 GPUs.

DeepSpeed wants ``engine.step()`` after every micro-batch; the last one of an optimizer step (the
accumulation boundary, where the update happens) is deferred to ``step()`` so the loop can refuse
a non-finite loss before any weight changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from simcot.train.config import Config, ConfigError
from simcot.train.engines.engine import Engine, param_groups

log = logging.getLogger(__name__)

# by path, not through the launchers package (train does not import launchers): the same folder
# in the source tree and in an installed wheel (simcot/launchers/ds_configs)
TEMPLATES = Path(__file__).resolve().parents[2] / "launchers" / "ds_configs"
TAG = "deepspeed"


def load_ds_json(spec: str) -> dict:
    path = Path(spec)
    if not path.is_file():
        path = TEMPLATES / f"{spec}.json"
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: no file '{spec}' and no template of that name "
                          f"(templates: {', '.join(p.stem for p in sorted(TEMPLATES.glob('*.json')))})")
    return json.loads(path.read_text())


def build_ds_config(cfg, world: int, accum: int, on_cpu: bool) -> dict:
    """The ds_config for a run; values a user's JSON fixes must agree with the simcot config."""
    t, d = cfg.train, cfg.deepspeed
    ds = load_ds_json(d.config) if d.config else {"steps_per_print": 10**9, "wall_clock_breakdown": False}
    zero = ds.setdefault("zero_optimization", {})
    if d.config and d.zero_stage and zero.get("stage", d.zero_stage) != d.zero_stage:
        raise ConfigError(f"deepspeed.zero_stage={d.zero_stage} disagrees with {d.config} (stage {zero['stage']})")
    zero.setdefault("stage", d.zero_stage)
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer, "pin_memory": not on_cpu,
                                     **({"nvme_path": d.nvme_path} if d.offload_optimizer == "nvme" else {})}
    if d.offload_params != "none":
        zero["offload_param"] = {"device": d.offload_params, "pin_memory": not on_cpu,
                                 **({"nvme_path": d.nvme_path} if d.offload_params == "nvme" else {})}
    wanted = {"train_batch_size": t.batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": accum, "gradient_clipping": t.grad_clip}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"ds_config {key}={ds[key]} disagrees with the simcot config ({value}); "
                              f"set it to \"auto\" or change train.batch_size / micro_batch_size / grad_clip")
        ds[key] = value
    for key, on in (("bf16", t.precision == "bf16"), ("fp16", t.precision == "fp16")):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") not in ("auto", on):
            raise ConfigError(f"ds_config {key}.enabled={section['enabled']} disagrees with train.precision={t.precision}")
        section["enabled"] = on
    offloaded = "offload_optimizer" in zero
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    ds["optimizer"]["params"].update({"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
                                      "weight_decay": t.weight_decay})
    if on_cpu and not offloaded:
        ds["optimizer"]["params"]["torch_adam"] = True  # no fused CUDA Adam on CPU, and no JIT build
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"ds_config values left as \"auto\" that simcot cannot fill: {', '.join(leftover)}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero3_enabled(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("stage", 0) == 3


class DeepSpeedEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int, device: torch.device, accum: int,
                 groups_fn=param_groups, *, ds_config: dict):
        import deepspeed

        super().__init__(cfg, total_steps, device, accum, groups_fn)
        self.ds_config = ds_config  # build_ds_config's, made before the model (ZeRO-3 needs it first)
        self._micro = 0
        model.to(device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups_fn(model, cfg.train.weight_decay), config=ds_config,
            lr_scheduler=self._schedule)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def zero3(self) -> bool:
        return zero3_enabled(self.ds_config)

    def forward(self, fn, *args):
        return self.engine(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        self._micro += 1
        if self._micro % self.accum:
            self.engine.step()  # not a boundary: bookkeeping only, no update

    def step(self) -> dict[str, float]:
        lr = max(self.engine.get_lr())
        self.engine.step()  # the accumulation boundary: clip, update, schedule
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else math.nan, "lr": float(lr)}

    def reset_optimizer(self) -> None:
        """Fresh Adam moments and step counts; the schedule keeps its position."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        inner.state.clear()

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=TAG)

    def load(self, path: Path, weights_only: bool = False) -> None:
        from simcot.train.engines.checkpoint import deepspeed_globals, weights_only_loads

        with weights_only_loads(deepspeed_globals()):  # DeepSpeed's own loader unpickles in full
            self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=not weights_only,
                                        load_lr_scheduler_states=not weights_only)

    def eval_context(self):
        """ZeRO-3: gather the whole model once for a no-grad evaluation (cfg.deepspeed.gather_for_eval)."""
        if not (self.zero3 and self.cfg.deepspeed.gather_for_eval):
            return contextlib.nullcontext()
        return whole_model(self.engine)


@contextlib.contextmanager
def whole_model(engine):
    """Every weight of a ZeRO-3 model whole on every rank for a no-grad pass, gathered once.

    GatheredParameters alone keeps them whole only until the first module forward: DeepSpeed's
    post-forward hook partitions each module's parameters again, so every decode step would
    all-gather the model anew. The module hooks are therefore taken off inside the gather and put
    back after it (what DeepSpeed's own ``unwrap_model_for_generation`` does, here exception-safe).
    """
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(engine.module.parameters())
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    if not (hasattr(offload, "forward_hooks") and hasattr(offload, "_register_deepspeed_module")):
        log.warning("this DeepSpeed version has no module-hook list to lift: evaluation re-gathers per forward")
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            released = sum(p.ds_status != ZeroParamStatus.AVAILABLE for p in params)
            if released:
                log.warning("%d of %d parameters were partitioned again during evaluation", released, len(params))
            else:
                log.info("ZeRO-3 evaluation ran on weights gathered once (%d tensors)", len(params))
            offload._register_deepspeed_module(offload.module)
