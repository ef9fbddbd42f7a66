"""`simcot export`: a checkpoint (either engine, ZeRO shards consolidated) as a Hugging Face folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` (safetensors, LoRA merged,
bf16 by default) and carries its tokenizer. A latent method's parts outside the HF model (CODI's
projection) go beside it in ``simcot_extras.safetensors`` with the run's config in ``simcot.yaml``,
so ``simcot eval --checkpoint <export>`` evaluates it exactly as trained. A method's
``auxiliary_parts`` (the SIM-CoT step decoder, SemCoT's encoder) are training-only and not exported.

Checks (a mismatch is an error, never a warning): the embedding rows equal the tokenizer's size,
and the written files reload with exactly the model's keys and shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from simcot.models.decoding import unwrap
from simcot.models.loading import check_loading_info
from simcot.train.assemble import DTYPES, EXPORT_META, EXTRAS, load_checkpoint_model
from simcot.train.engines.checkpoint import load_trainer_state, resolve_checkpoint
from simcot.train.config import dump_yaml


def export(checkpoint: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint)
    cfg, built, _ = load_checkpoint_model(ckpt, device="cpu", inference=True)
    lm = built.model.lm
    lm = lm.merge_and_unload() if hasattr(lm, "merge_and_unload") else unwrap(lm)
    rows = lm.get_input_embeddings().num_embeddings
    if rows != len(built.tok):
        raise ValueError(f"embedding has {rows} rows but the tokenizer has {len(built.tok)} tokens")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.to(DTYPES[dtype]).save_pretrained(str(tmp), safe_serialization=True)
    built.tok.save_pretrained(str(tmp))
    extras = {k: v.to(DTYPES[dtype]).contiguous() for k, v in built.model.extras_state_dict().items()}
    if extras:
        save_file(extras, str(tmp / EXTRAS))
    cfg.model.lora_r = 0  # merged
    (tmp / "simcot.yaml").write_text(dump_yaml(cfg))
    meta = load_trainer_state(ckpt)
    (tmp / EXPORT_META).write_text(json.dumps({"source": str(ckpt.resolve()), "dtype": dtype,
                                               "epoch": meta.get("epoch"), "global_step": meta.get("global_step"),
                                               "mlflow_run_id": meta.get("mlflow_run_id", "")}, indent=2))
    verify_reload(tmp, lm, DTYPES[dtype])
    if extras and set(load_file(str(tmp / EXTRAS))) != set(extras):
        raise ValueError("extras file does not hold the model's extra parameters")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def verify_reload(folder: Path, lm: torch.nn.Module, dtype: torch.dtype) -> None:
    """Strict round trip: from_pretrained must find every tensor in `folder` and hold exactly `lm`'s values."""
    from transformers import AutoModelForCausalLM

    again, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    check_loading_info(info, f"export {folder}")
    want, got = lm.state_dict(), again.state_dict()
    if {k: tuple(v.shape) for k, v in want.items()} != {k: tuple(v.shape) for k, v in got.items()}:
        raise ValueError(f"exported model does not reload with the same keys/shapes: "
                         f"{sorted(set(want) ^ set(got))[:6]}")
    differ = [k for k in want if not torch.equal(want[k].to(dtype), got[k])]
    if differ:
        raise ValueError(f"exported model reloads with other values in {', '.join(differ[:6])}")
