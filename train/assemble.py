"""Run assembly: a validated config, then data -> tokenizer -> model + method (``build``), and the
weights of a checkpoint or an export loaded into it (``load_checkpoint_model``).

Every command starts here (``simcot train`` through the runner, ``eval``, ``export``,
``decode``); none of them imports another command for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from simcot.models.checkpointing import enable_checkpointing
from simcot.models.latent_lm import LatentLM
from simcot.models.loading import apply_lora, build_lm
from simcot.train import config
from simcot.train.engines.checkpoint import load_state_strict, load_weights, resolve_checkpoint
from simcot.train.config import Config, apply_overrides, config_from_dict, validate
from simcot.train.data.examples import Example, tokenize
from simcot.train.methods import METHODS, validate_method
from simcot.train.data.sources import Splits, load_splits
from simcot.train.data.tokenizer import SpecialIds, build_tokenizer, load_tokenizer_from

# An export folder (written by ``simcot export``, read back here): its metadata, the parameters
# outside the HF model, and the dtypes it may be written in.
EXPORT_META = "simcot_export.json"
EXTRAS = "simcot_extras.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """``config.load_config`` (defaults <- YAML <- overrides, the generic checks), then the method's
    own: the config module knows no methods, the registry does."""
    cfg = config.load_config(path, overrides)
    validate_method(cfg)
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Built:
    """Everything a run needs, assembled from a config."""

    cfg: Config
    splits: Splits
    tok: object
    special: SpecialIds
    examples: dict[str, list[Example]]  # by split
    model: LatentLM
    method: object


def build(cfg: Config, run_dir: Path, checkpoint: Path | None = None, init_from: Path | None = None,
          tokenizer_from: Path | None = None, inference: bool = False) -> Built:
    """Data, tokenizer, tokenized examples, model and method.

    `checkpoint`: take the tokenizer and the architecture from a checkpoint (its weights are
    loaded afterwards by the caller). `init_from` (train.init_from): the tokenizer and the main
    LM's weights, loaded before the method adds its parts, so that parts copied from the LM (the
    SIM-CoT decoder, SemCoT's encoder and generator) copy the trained weights.
    `tokenizer_from`: only the tokenizer (an export). `inference`: build only what evaluation
    needs (none of the method's ``auxiliary_parts``).
    """
    validate_method(cfg)  # a config made without load_config (an API caller's) meets the method's rules here
    splits = load_splits(cfg.data)
    tokenizer_from = checkpoint or init_from or tokenizer_from
    if tokenizer_from:
        tok = load_tokenizer_from(tokenizer_from)
    else:
        tok = build_tokenizer(cfg.model, splits.train, cfg.data.answer_prefix, run_dir / "tokenizer")
    special = SpecialIds.of(tok)
    examples = {s: tokenize(splits[s], tok, cfg.data.answer_prefix, cfg.data.max_tokens if s == "train" else 0)
                for s in ("train", "val", "test")}
    torch.manual_seed(cfg.train.seed)
    lm = build_lm(cfg.model, tok, torch.float32, checkpoint=checkpoint)
    init_state = load_lm_state(init_from) if init_from is not None and checkpoint is None else None
    if init_state is not None and not _peft_keys(init_state):
        load_state_strict(lm, init_state, f"init_from {init_from}")
    if cfg.model.lora_r > 0:
        lm = apply_lora(lm, cfg.model)
    if init_state is not None and _peft_keys(init_state):  # the LM was saved with its LoRA adapter
        load_state_strict(lm, init_state, f"init_from {init_from}")
    model = LatentLM(lm)
    method = METHODS[cfg.method](cfg, tok, special, inference=inference)
    method.restoring = checkpoint is not None
    method.setup_model(model)
    if cfg.model.gradient_checkpointing and not inference:
        enable_checkpointing(model.lm, latent=method.uses_latents)
    return Built(cfg, splits, tok, special, examples, model, method)


def load_lm_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The main LM's weights in a checkpoint (``train.init_from``); the method's extras start fresh."""
    return {k[3:]: v for k, v in load_weights(ckpt).items() if k.startswith("lm.")}


def _peft_keys(state: dict) -> bool:
    return any(k.startswith("base_model.") for k in state)


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_META).is_file()


def apply_threads(threads: int) -> None:
    """train.threads for every command that computes (train, eval, decode, export): the one place."""
    if threads:
        torch.set_num_threads(threads)


def load_checkpoint_config(ckpt: Path, overrides: dict | None = None, name: str = "config.yaml") -> Config:
    """A checkpoint's config with `overrides` on top. Its train.threads (the flag given now, else
    the one it was trained with) applies here: eval, decode, export and resume all come through."""
    cfg = config_from_dict(yaml.safe_load((ckpt / name).read_text()))
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    validate_method(cfg)
    apply_threads(cfg.train.threads)
    return cfg


def load_checkpoint_model(checkpoint: str | Path, overrides: dict | None = None, device: str = "auto",
                          inference: bool = True):
    """(cfg, built, device) with the checkpoint's weights loaded on `device`.

    Loading is strict: every parameter of the model must be in the file and nothing else may be,
    except the weights of the method's ``auxiliary_parts`` (the SIM-CoT step decoder, SemCoT's
    encoder), which an inference model does not build.
    """
    ckpt = resolve_checkpoint(checkpoint)
    if is_export(ckpt):
        return load_exported(ckpt, overrides, device)
    cfg = load_checkpoint_config(ckpt, overrides)
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    built = build(cfg, ckpt.parent.parent, checkpoint=ckpt, inference=inference)
    load_state_strict(built.model, load_weights(ckpt), f"checkpoint {ckpt}",
                      built.method.auxiliary_prefixes() if inference else ())
    built.model.to(dev).eval()
    return cfg, built, dev


def load_exported(path: str | Path, overrides: dict | None = None, device: str = "auto"):
    """(cfg, built, device) from an export folder: the HF model via from_pretrained, extras strictly."""
    path = Path(path)
    cfg = load_checkpoint_config(path, overrides, name="simcot.yaml")
    cfg.model.name, cfg.model.pretrained, cfg.model.lora_r = str(path), True, 0
    meta = json.loads((path / EXPORT_META).read_text())
    cfg.model.attn_implementation = cfg.model.attn_implementation
    built = build(cfg, path, tokenizer_from=path, inference=True)
    built.model.to(DTYPES[meta["dtype"]])
    extras = load_file(str(path / EXTRAS)) if (path / EXTRAS).is_file() else {}
    expected = set(built.model.extras_state_dict())
    if set(extras) != expected:
        raise ValueError(f"{path}: extras {sorted(extras)} do not match the model's {sorted(expected)}")
    if extras:
        load_state_strict(built.model, {**{f"lm.{k}": v for k, v in built.model.lm.state_dict().items()}, **extras},
                          f"export {path}")
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    return cfg, built, dev
