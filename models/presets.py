"""Model presets: tiny random-init models for CPU work, and the real shapes for planning.

The real shapes (``gpt2``, ``llama-3.*``) build random-init models from their published
configs: use them for memory planning, throughput measurements, or as the architecture of a
user's checkpoint. Pretrained weights come from ``--model.pretrained true`` (hub id below) or
from a local path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    family: str  # "llama" | "gpt2"
    config: dict[str, Any] = field(default_factory=dict)
    hub_id: str = ""  # where pretrained weights live, for --model.pretrained

    def hf_config(self, vocab_size: int | None = None, hidden_size: int = 0, num_layers: int = 0,
                  num_heads: int = 0, attn_implementation: str = "sdpa"):
        from transformers import GPT2Config, LlamaConfig

        kw = dict(self.config)
        if self.family == "llama":
            if hidden_size:
                kw["hidden_size"] = hidden_size
                kw["intermediate_size"] = int(hidden_size * kw["intermediate_size"] / self.config["hidden_size"])
            if num_layers:
                kw["num_hidden_layers"] = num_layers
            if num_heads:
                kw["num_attention_heads"] = kw["num_key_value_heads"] = num_heads
                kw.pop("head_dim", None)
            if vocab_size:
                kw["vocab_size"] = vocab_size
            cfg = LlamaConfig(**kw)
        else:
            if hidden_size:
                kw["n_embd"] = hidden_size
            if num_layers:
                kw["n_layer"] = num_layers
            if num_heads:
                kw["n_head"] = num_heads
            if vocab_size:
                kw["vocab_size"] = vocab_size
            cfg = GPT2Config(**kw)
        cfg._attn_implementation = attn_implementation
        return cfg


_LLAMA3 = dict(rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", max_position_embeddings=131072,
               bos_token_id=128000, eos_token_id=128001, vocab_size=128256,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

PRESETS: dict[str, Preset] = {
    # ~2.5M parameters with a 384-piece vocabulary: a few minutes on 2 CPU cores.
    "tiny-llama": Preset("llama", dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "tiny-gpt2": Preset("gpt2", dict(n_embd=192, n_layer=4, n_head=4, n_positions=1024,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt2": Preset("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
                   hub_id="openai-community/gpt2"),
    "llama-3.2-1b": Preset("llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         tie_word_embeddings=True), hub_id="meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": Preset("llama", dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                         num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                         tie_word_embeddings=True), hub_id="meta-llama/Llama-3.2-3B"),
    "llama-3.1-8b": Preset("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                         tie_word_embeddings=False), hub_id="meta-llama/Llama-3.1-8B"),
}

TINY = ("tiny-llama", "tiny-gpt2")


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name)
