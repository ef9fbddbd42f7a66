"""Checkpoints: written atomically, found again by --resume.

A checkpoint is a folder ``<run>/checkpoints/step_NNNNNNN`` holding the engine's part (weights
as safetensors + optimizer/scheduler state, or DeepSpeed's shards), the tokenizer, the model's
HF ``config.json``, the simcot config, the trainer state (step, epoch, data position, MLflow run)
and the RNG states. It is assembled under a temporary name and renamed into place, and the
``latest`` pointer is replaced atomically, so a crash mid-save never leaves a half checkpoint
behind the pointer.

Loading never runs code from a file: every ``torch.load`` (ours and DeepSpeed's) is weights-only,
and the RNG states are stored as tensors and numbers. A file that weights-only loading refuses
is an error naming it, unless the user trusts the checkpoint explicitly (``SIMCOT_TRUST_CHECKPOINTS=1``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from simcot.models.decoding import unwrap
from simcot.parallel import any_partitioned

LATEST = "latest"
TRUST_ENV = "SIMCOT_TRUST_CHECKPOINTS"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (damaged, or refused by weights-only loading): the
    message names the file."""


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "") not in ("", "0", "false", "False")


# Old checkpoints pickled numpy's RNG state as an ndarray: these numpy globals rebuild an array and
# nothing else, so allowing them keeps those checkpoints loadable without trusting them.
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType,
                        getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def safe_load(path: str | Path, map_location="cpu", allow: list | tuple = ()):
    """``torch.load`` that runs no code from the file (weights-only, plus the `allow`ed globals).

    A file weights-only loading refuses is a :class:`CheckpointError` naming it, unless
    SIMCOT_TRUST_CHECKPOINTS=1 (then it is unpickled in full, with a warning); a damaged file is
    one too."""
    weights_only = not trusted()
    if not weights_only:
        log.warning("%s=1: unpickling %s in full (this runs any code the file holds)", TRUST_ENV, path)
    if isinstance(path, (str, Path)) and Path(path).is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable PyTorch file (damaged or truncated: no zip directory)")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler error" in ln),
                     lines[0] if lines else type(e).__name__).split(" was not an allowed")[0]
        raise CheckpointError(f"{path}: weights-only loading refused it ({first}); load it only if you trust "
                              f"where it came from, with {TRUST_ENV}=1") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file (damaged or truncated?): {first}") from None


_TORCH_LOAD = torch.load


@contextlib.contextmanager
def weights_only_loads(allow: list | tuple = ()):
    """Every ``torch.load`` inside goes through :func:`safe_load`: DeepSpeed's checkpoint engine and
    zero-to-fp32 ask torch for full unpickling, which would run code from the file."""
    def load(f, map_location=None, *args, **kwargs):
        return safe_load(f, map_location, allow)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


def rng_state() -> dict:
    """The RNG states as tensors and numbers (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)  # a tuple with an ndarray: a checkpoint from before the weights-only form
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, engine, tok, config_yaml: str, trainer_state: dict,
                    keep: int = 2, is_writer: bool = True) -> Path:
    """Write a checkpoint; every rank calls this (the engine may save shards), rank 0 writes the rest."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp"
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{engine.rank}.pt")  # dropout streams differ per rank
    _barrier()
    if is_writer:
        tok.save_pretrained(str(tmp))
        unwrap(engine.module.lm).config.save_pretrained(str(tmp))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(ckpt_root / LATEST, final.name)
        _prune(ckpt_root, keep)
    _barrier()
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    ckpts = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint, a run folder or a checkpoints folder."""
    p = Path(path)
    if (p / "simcot_export.json").is_file():  # an export folder (simcot export) evaluates like a checkpoint
        return p
    for cand in (p, p / "checkpoints"):
        if (cand / "trainer_state.json").is_file():
            return cand
        if (cand / LATEST).is_file():
            target = cand / (cand / LATEST).read_text().strip()
            if (target / "trainer_state.json").is_file():
                return target
    raise FileNotFoundError(f"no checkpoint found at {p} (expected a checkpoint folder or a run folder "
                            f"with checkpoints/{LATEST})")


def load_rng_state(ckpt: Path, rank: int) -> None:
    path = Path(ckpt) / f"rng_rank{rank}.pt"
    if not path.is_file():  # resumed on more processes than saved it: data order is still exact
        import logging

        logging.getLogger(__name__).warning("%s has no RNG state for rank %d (saved by fewer processes): "
                                            "dropout streams will differ from the original run", ckpt, rank)
        return
    set_rng_state(safe_load(path, allow=_NUMPY_ARRAY_GLOBALS))


def load_trainer_state(ckpt: Path) -> dict:
    """Step, epoch and MLflow run of a checkpoint (or of the checkpoint an export came from)."""
    ckpt = Path(ckpt)
    name = "trainer_state.json" if (ckpt / "trainer_state.json").is_file() else "simcot_export.json"
    return json.loads((ckpt / name).read_text())


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full (consolidated) state dict of a checkpoint, whichever engine wrote it.

    ``model.safetensors`` (plain PyTorch engine), or DeepSpeed's folder: ZeRO 1-3 shards are
    consolidated to fp32 with DeepSpeed's zero-to-fp32; stage 0 keeps the module state whole.
    """
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        return load_safetensors(ckpt / "model.safetensors")
    ds = ckpt / "deepspeed"
    if not ds.is_dir():
        raise FileNotFoundError(f"{ckpt} holds neither model.safetensors nor a deepspeed/ checkpoint")
    if any(ds.glob("*optim_states.pt")) and any(ds.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads(deepspeed_globals()):
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed"))
    return safe_load(ds / "mp_rank_00_model_states.pt", allow=deepspeed_globals())["module"]


def deepspeed_globals() -> list:
    """Plain-data classes DeepSpeed pickles into its checkpoint files (an enum, the loss scaler, a
    dataclass); `torch.serialization.get_unsafe_globals_in_checkpoint` lists a file's."""
    out = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):  # plain attributes (scale, counters), no custom unpickling
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):  # a dataclass of two ints
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    return out


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: damaged safetensors file ({e})") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                      ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` so that every parameter is covered and nothing foreign is left over.

    Checkpoints keep one name per tied tensor (embeddings and lm_head): every name of a tie group
    is filled from the one present. Keys under `ignore_prefixes` (e.g. the step decoder, absent
    from an inference model) may be dropped; anything else missing or unexpected is an error.
    """
    state = dict(state)
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        kept = next((n for n in names if n in state), None)
        for n in names if kept else []:
            state.setdefault(n, state[kept])
    if any_partitioned(module):
        missing, unexpected = _load_partitioned(module, state)
    else:
        missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(ignore_prefixes)]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model built from its config: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")


def _load_partitioned(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """load_state_dict for a ZeRO-3 partitioned module (its parameters are empty shards): each
    parameter is gathered, written on rank 0 and re-partitioned. Buffers load as usual."""
    import deepspeed
    import torch.distributed as dist

    params = dict(module.named_parameters(remove_duplicate=False))
    keys = set(module.state_dict().keys())
    buffers = {k: b for k, b in module.named_buffers() if k in keys}  # persistent ones only
    missing = [k for k in list(params) + list(buffers) if k not in state]
    unexpected = [k for k in state if k not in params and k not in buffers]
    done: set[int] = set()
    for name, p in params.items():
        if name not in state or id(p) in done:
            continue
        done.add(id(p))
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if dist.get_rank() == 0:
                if p.shape != state[name].shape:
                    raise ValueError(f"shape mismatch for '{name}': {tuple(state[name].shape)} vs {tuple(p.shape)}")
                p.copy_(state[name])
    with torch.no_grad():
        for name, b in buffers.items():
            if name in state:
                b.copy_(state[name])
    return missing, unexpected
