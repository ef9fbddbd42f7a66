"""SemCoT's light generator: a small LM that writes N implicit tokens for the answering model.

The question followed by N ``<thought>`` slots runs in one parallel forward (not token by
token); the final states at the slots, mapped by a linear layer to the answering model's width,
are the implicit tokens. The ``<thought>`` input is one trainable vector (the reference adds a
token and masks the gradient of every other embedding row: the same thing); the generator's
token embeddings stay frozen. The slots are marked in the input ids with the run's
``<|latent|>`` id, which the generator never looks up.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from simcot.kernels.zero3 import gathered
from simcot.models.decoding import body, positions, unwrap
from simcot.models.loading import copy_weights

def hidden_size(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def truncated_copy(lm: nn.Module, k: int) -> nn.Module:
    """A headless copy of `lm` with its embeddings and first `k` layers (the default generator)."""
    from transformers import AutoModel

    base = unwrap(lm)
    cfg = copy.deepcopy(base.config)
    n = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    if not 1 <= k <= n:
        raise ValueError(f"semcot.generator=truncate:{k}: the answering model has {n} layers")
    if cfg.model_type == "gpt2":
        cfg.n_layer = k
    else:
        cfg.num_hidden_layers = k
    out = AutoModel.from_config(cfg)
    copy_weights(out, body(lm), lambda name: name)
    return out


def build_generator_lm(spec: str, lm: nn.Module, vocab: int) -> nn.Module:
    """'truncate:K', a simcot preset (random init) or a Hugging Face path/name (pretrained)."""
    from transformers import AutoModel

    from simcot.models.presets import get_preset

    if spec.startswith("truncate:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"semcot.generator: expected 'truncate:K', got '{spec}'") from None
        return truncated_copy(lm, k)
    preset = get_preset(spec)
    if preset is not None:
        cfg = preset.hf_config(vocab)
        return AutoModel.from_config(cfg)
    gen = AutoModel.from_pretrained(spec)
    if gen.get_input_embeddings().num_embeddings < vocab:  # the run's special tokens (never looked up)
        gen.resize_token_embeddings(vocab, mean_resizing=False)
    return gen


class ThoughtGenerator(nn.Module):
    def __init__(self, gen_lm: nn.Module, out_dim: int):
        super().__init__()
        self.lm = gen_lm
        self.lm.get_input_embeddings().weight.requires_grad_(False)
        d = hidden_size(gen_lm.config)
        emb = gen_lm.get_input_embeddings().weight
        with gathered(emb):  # under ZeRO-3 the shard is empty: every rank reads the whole table's mean
            self.thought = nn.Parameter(emb.detach().float().mean(0).clone() if emb.numel() else torch.zeros(d))
        self.proj = nn.Linear(d, out_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, slot_id: int, n: int,
                train_body: bool = True) -> torch.Tensor:
        """Implicit tokens (B, n, out_dim) for left-padded `ids` ending in n `slot_id` slots."""
        slots = ids == slot_id
        emb = self.lm.get_input_embeddings()(ids.masked_fill(slots, 0))
        emb = emb.masked_scatter(slots.unsqueeze(-1), self.thought.to(emb.dtype).expand(int(slots.sum()), -1))
        # projection phase: the body (and so the <thought> vector before it) gets no gradient
        with torch.set_grad_enabled(train_body and torch.is_grad_enabled()):
            h = self.lm(inputs_embeds=emb, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        return self.proj(h[:, -n:])
