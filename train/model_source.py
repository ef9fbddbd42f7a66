"""Is `model.name` something a run can load? Checked before any data is generated or folder made.

A preset, a local Hugging Face model folder, or a hub id that is cached or answers: anything
else is one line with a did-you-mean, not a minute of hub retries and a traceback.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from simcot.models.config import ModelConfig
from simcot.models.loading import check_safetensors, is_random_init, weights_source
from simcot.models.presets import PRESETS
from simcot.train.config import ConfigError

HUB_TIMEOUT_S = 10  # one metadata request, not the minute of retries from_pretrained spends offline

def check_model_source(mcfg: ModelConfig) -> None:
    """Fail fast, before any data is generated, when `model.name` (or `model.tokenizer`) is neither
    a preset, nor a local model folder, nor a hub id that is cached or reachable."""
    if is_random_init(mcfg):
        if mcfg.tokenizer:
            _check_source(mcfg.tokenizer, "model.tokenizer")
        return
    _check_source(weights_source(mcfg), "model.name")
    if mcfg.tokenizer:
        _check_source(mcfg.tokenizer, "model.tokenizer")

def _check_source(name: str, key: str) -> None:

    path = Path(name).expanduser()
    if path.is_dir():
        if key == "model.name" and not (path / "config.json").is_file():
            raise ConfigError(f"{key} '{name}': the folder has no config.json (not a Hugging Face model folder)")
        if key == "model.name":
            check_safetensors(path)
        return
    if _hub_has(name):
        return
    close = difflib.get_close_matches(name, sorted(PRESETS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (presets: {', '.join(PRESETS)})"
    raise ConfigError(f"{key} '{name}' is not a preset, a local folder or a reachable hub id{hint}")


def _hub_has(repo_id: str) -> bool:
    """True when `repo_id` is in the local hub cache, or (online) the hub answers for it."""
    from huggingface_hub import try_to_load_from_cache

    if name_is_path_like(repo_id):
        return False
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return True
        if isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str):
            return True
    except ValueError:  # not a valid repo id
        return False
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        return False
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - not found, gated, offline, timeout: all "not reachable"
        from huggingface_hub.errors import GatedRepoError

        return isinstance(e, GatedRepoError)  # it exists; from_pretrained names the missing access token

def name_is_path_like(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
