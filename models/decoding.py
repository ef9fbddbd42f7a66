"""Access to the parts of a causal LM, and batched greedy decoding with a KV cache.

Decoding takes a left-padded batch (positions that ignore the padding, an attention mask that
hides it) and an optional cache already holding a prefix (the latent rollout fills one), then
runs one single-token forward per step for the whole batch. Finished rows keep emitting pad.
Under ZeRO-3 every rank must make the same number of forward passes, so the stop decision is
all-reduced across the data-parallel group when one is given.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from simcot.parallel import decoding_done


def unwrap(lm: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


def body(lm: nn.Module) -> nn.Module:
    """The transformer stack that returns final (normed) hidden states."""
    return unwrap(lm).get_decoder()


def head(lm: nn.Module) -> nn.Module:
    return unwrap(lm).get_output_embeddings()


@functools.cache
def _cache_keyword(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def with_cache(module: nn.Module, cache) -> dict:
    """The keyword argument that hands `module` a KV cache: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there and removed in 5.40), ``past_key_values`` before."""
    return {_cache_keyword(type(unwrap(module))): cache}


def cache_of(out) -> object:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: (ids, attention_mask), both (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Prefill:
    """State after the prompt ran: the logits of its last position, cache, mask, next positions."""

    logits: torch.Tensor  # (B, V)
    cache: object
    mask: torch.Tensor  # (B, T_cache)
    next_pos: torch.Tensor  # (B,)
    metrics: dict = field(default_factory=dict)  # per-batch means reported by evaluation (latent health)


def prefill_ids(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Prefill:
    pos = positions(mask)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return Prefill(out.logits[:, -1], cache_of(out), mask, pos[:, -1] + 1)


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the smallest set of
    tokens whose probability reaches top_p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_p.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def greedy_decode(lm: nn.Module, state: Prefill, max_new_tokens: int, eos_id: int, pad_id: int,
                  group=None, synced: bool = False, temperature: float = 0.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy continuation of `state`: (B, <= max_new_tokens) ids, pad after each row's eos.
    With `temperature` > 0 tokens are sampled (top-p) instead, from `generator` (CPU).

    `synced` forces every rank to run the same number of steps (ZeRO-3); the stop test is then
    an all-reduce over `group`.
    """
    bsz = state.logits.shape[0]
    device = state.logits.device
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    mask, cache, pos = state.mask, state.cache, state.next_pos.clone()
    logits = state.logits
    out = []
    for t in range(max_new_tokens):
        nxt = sample_top_p(logits, temperature, top_p, generator) if temperature > 0 else logits.argmax(-1)
        tok = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), nxt)
        out.append(tok)
        done = done | (tok == eos_id)
        if t == max_new_tokens - 1:
            break
        if decoding_done(done, synced, group):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                  **with_cache(lm, cache))
        cache, logits = cache_of(step), step.logits[:, -1]
        pos = pos + 1
    return torch.stack(out, dim=1) if out else torch.empty(bsz, 0, dtype=torch.long, device=device)


def trim_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
