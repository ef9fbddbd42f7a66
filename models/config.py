"""What model to build: the model section of a run's config (``--model.*``).

It lives with the models so that building one needs nothing from the training side;
``simcot.train.config.Config`` nests it like every other section.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcot.options import opt


@dataclass
class ModelConfig:
    name: str = opt("tiny-llama", "Preset (tiny-llama, tiny-gpt2, gpt2, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b) "
                    "or a Hugging Face model path/name")
    pretrained: bool = opt(False, "Load weights with from_pretrained (always true for a path that is not a preset)")
    tokenizer: str = opt("", "Tokenizer path/name; empty = the model's own, or a SentencePiece tokenizer trained "
                         "on the task text for randomly initialised presets")
    vocab_size: int = opt(384, "Vocabulary size of the locally trained SentencePiece tokenizer (a soft limit)")
    pad_vocab_to: int = opt(0, "Random-init presets: give the embedding and head this many rows (e.g. 128256) "
                            "although the local tokenizer is small, to time or plan a real vocabulary (0 = off)")
    hidden_size: int = opt(0, "Override the preset's hidden size (0 = keep)")
    num_layers: int = opt(0, "Override the preset's number of layers (0 = keep)")
    num_heads: int = opt(0, "Override the preset's number of attention heads (0 = keep)")
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa or eager")
    init_special_from: str = opt("<<", "Initialise the embeddings of new special tokens from this token "
                                 "(Coconut copies '<<'); falls back to the mean embedding when it is not one token")
    lora_r: int = opt(0, "LoRA rank on the main model (0 = full fine-tuning); needs peft")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.1, "LoRA dropout")
    lora_targets: str = opt("auto", "Comma-separated module names for LoRA; auto = all linear layers of the family")
    gradient_checkpointing: bool = opt(False, "Non-reentrant activation checkpointing of the main model (latent "
                                       "methods: the MLP blocks, so the rollout keeps its KV cache)")
