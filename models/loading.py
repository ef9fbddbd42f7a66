"""Build the causal LM from a :class:`ModelConfig` and the run's tokenizer (which the training
side builds, ``simcot.train.data.tokenizer.build_tokenizer``, and passes in).

- A preset without ``pretrained``: a random-init model from the preset's config, sized to the
  tokenizer (a SentencePiece tokenizer trained on the task text unless one is given).
- A path or hub name (or a preset with ``pretrained``): ``from_pretrained`` for both; simcot's
  special tokens are added and the embeddings resized, new rows initialised from an existing
  token (Coconut copies ``<<``) or from the mean embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from simcot.models.config import ModelConfig
from simcot.models.presets import get_preset
from simcot.parallel import any_partitioned, is_partitioned, rank

log = logging.getLogger(__name__)

def check_safetensors(folder: Path) -> None:
    """Every ``*.safetensors`` file of a model folder has a whole header and all its data: a
    truncated download is an error naming the file, not a library traceback."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the message says which
            raise ValueError(f"{f}: damaged safetensors file ({e})") from None


def is_random_init(mcfg: ModelConfig) -> bool:
    return get_preset(mcfg.name) is not None and not mcfg.pretrained


def weights_source(mcfg: ModelConfig) -> str:
    preset = get_preset(mcfg.name)
    if preset is not None:
        if not preset.hub_id:
            raise ValueError(f"preset '{mcfg.name}' has no pretrained weights; drop --model.pretrained")
        return preset.hub_id
    return mcfg.name


def _init_new_rows(model, tok, n_old: int, init_from: str) -> None:
    """Initialise embedding (and untied lm_head) rows added for new tokens."""
    n_new = len(tok)
    if n_new <= n_old:
        return
    src = tok.encode(init_from, add_special_tokens=False) if init_from else []
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else None
    with _gathered_for_write([w for w in (emb, head) if w is not None]), torch.no_grad():
        for w in {id(emb): emb, id(head): head}.values():
            if w is None:
                continue
            if len(src) == 1 and src[0] < n_old:
                w[n_old:n_new] = w[src[0]]
            else:
                w[n_old:n_new] = w[:n_old].mean(0)
    if len(src) != 1:
        log.info("'%s' is not a single token: new special-token rows start at the mean embedding", init_from)


def _gathered_for_write(params):
    """ZeRO-3 partitions weights to empty shards: gather them (rank 0 writes, then re-partition)."""
    import contextlib

    if not any_partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def check_loading_info(info: dict, source: str) -> None:
    """A pretrained model whose file lacks weights (or holds them in other shapes) would train from
    random values without a word from from_pretrained: make that an error naming the tensors."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        parts = ([f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else []) + \
                ([f"shape mismatch {', '.join(mismatched[:8])}"] if mismatched else [])
        raise ValueError(f"{source}: the weights do not fit the model ({'; '.join(parts)})")


def build_lm(mcfg: ModelConfig, tok, dtype: torch.dtype = torch.float32, checkpoint: str | Path | None = None):
    """The causal LM.

    With `checkpoint` (a simcot checkpoint folder) the architecture comes from its config.json
    and the weights are left to the caller (the engine loads them): nothing is downloaded or
    loaded twice.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if checkpoint is not None:
        cfg = AutoConfig.from_pretrained(str(checkpoint))
        cfg._attn_implementation = mcfg.attn_implementation
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif is_random_init(mcfg):
        cfg = get_preset(mcfg.name).hf_config(max(len(tok), mcfg.pad_vocab_to), mcfg.hidden_size,
                                              mcfg.num_layers, mcfg.num_heads, mcfg.attn_implementation)
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        source = weights_source(mcfg)
        if Path(source).is_dir():
            check_safetensors(Path(source))
        try:
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                               attn_implementation=mcfg.attn_implementation,
                                                               output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:  # names no file: say which model failed
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{source}: cannot load the model: {type(e).__name__}: {first}") from None
        check_loading_info(info, source)
    n_old = model.get_input_embeddings().num_embeddings  # not weight.shape: a ZeRO-3 shard reports [0]
    if len(tok) > n_old:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        _init_new_rows(model, tok, n_old, mcfg.init_special_from)
    elif len(tok) < n_old and checkpoint is None and is_random_init(mcfg) and n_old != mcfg.pad_vocab_to:
        raise ValueError(f"model vocabulary ({n_old}) is larger than the tokenizer's ({len(tok)})")
    return model


def apply_lora(model, mcfg: ModelConfig):
    """Wrap the LM with a peft LoRA adapter (CODI/SIM-CoT use r=128, alpha=32 at scale)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model.lora_r > 0 needs peft: pip install 'simcot[lora]'") from e
    targets = mcfg.lora_targets
    if targets == "auto":
        family = model.config.model_type
        targets = "c_attn,c_proj,c_fc" if family == "gpt2" else "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lcfg = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                      target_modules=[t.strip() for t in targets.split(",")], task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module, rename) -> int:
    """Copy parameters (and buffers) of `src` into `dst`: ``rename(dst_name)`` gives the source
    name, or None to leave that tensor alone. Works on ZeRO-3 partitioned modules (gathered
    pairwise, rank 0 writes). Returns the number of tensors copied."""
    src_p = dict(src.named_parameters())
    src_b = dict(src.named_buffers())
    n = 0
    with torch.no_grad():
        for name, p in list(dst.named_parameters()) + list(dst.named_buffers()):
            key = rename(name)
            if key is None:
                continue
            s = src_p.get(key, src_b.get(key))
            if s is None:
                raise KeyError(f"no tensor '{key}' in the source module (for '{name}')")
            with _gathered_for_write([t for t in (p, s) if isinstance(t, torch.nn.Parameter)]):
                if rank() == 0 or not is_partitioned(p):
                    if p.shape != s.shape:
                        raise ValueError(f"shape mismatch copying '{key}' {tuple(s.shape)} into '{name}' {tuple(p.shape)}")
                    p.copy_(s)
            n += 1
    return n
