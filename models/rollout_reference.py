"""Plain references for the batched rollout: the definitions it is tested and benchmarked against.

- :func:`per_sample_hidden`: one sample, no padding, no cache; the full sequence is re-run once
  per latent (Coconut's multi-pass algorithm in its simplest form).
- :func:`multipass_hidden`: the same multi-pass algorithm on a padded batch (the reference's way:
  every pass recomputes the whole prefix, no KV cache).
- :func:`naive_generate`: Coconut's reference ``generate`` (batch 1, no KV cache), its stop rule included.
"""

from __future__ import annotations

import torch

from simcot.models.decoding import body, positions


def _feedback(model, h: torch.Tensor) -> torch.Tensor:
    proj = getattr(model, "projection", None)
    return proj(h) if proj is not None else h


def per_sample_hidden(model, prefix: list[int], n_latents: int, cont: list[int]) -> torch.Tensor:
    """Hidden states (len(cont), H) of `cont` after `prefix` and `n_latents` recycled latents."""
    stack = body(model.lm)
    dev = next(model.parameters()).device
    ids = torch.tensor([prefix + [0] * n_latents + cont], device=dev)
    embeds = model.lm.get_input_embeddings()(ids)
    start = len(prefix)
    for j in range(n_latents):
        h = stack(inputs_embeds=embeds[:, : start + j]).last_hidden_state[:, -1]
        embeds = torch.cat([embeds[:, : start + j], _feedback(model, h)[:, None], embeds[:, start + j + 1:]], 1)
    return stack(inputs_embeds=embeds).last_hidden_state[0, start + n_latents:]


def multipass_hidden(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, n_latents: torch.Tensor,
                     max_latents: int, cont_ids: torch.Tensor, cont_mask: torch.Tensor) -> torch.Tensor:
    """Batched multi-pass without a cache, same layout as the rollout: hidden states (B, C, H)."""
    stack = body(model.lm)
    emb = model.lm.get_input_embeddings()
    bsz, plen = prefix_ids.shape
    slot_mask = (torch.arange(max_latents, device=prefix_ids.device)[None] < n_latents[:, None]).long()
    mask = torch.cat([prefix_mask, slot_mask, cont_mask], 1)
    pos = positions(mask)
    pad = torch.zeros(bsz, max_latents, dtype=torch.long, device=prefix_ids.device)
    embeds = emb(torch.cat([prefix_ids, pad, cont_ids], 1))
    for j in range(max_latents):
        end = plen + j
        h = stack(inputs_embeds=embeds[:, :end], attention_mask=mask[:, :end],
                  position_ids=pos[:, :end]).last_hidden_state[:, -1]
        e = torch.where(slot_mask[:, j, None].bool(), _feedback(model, h), embeds[:, end])
        embeds = torch.cat([embeds[:, :end], e[:, None], embeds[:, end + 1:]], 1)
    out = stack(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    return out[:, plen + max_latents:]


@torch.no_grad()
def naive_generate(model, prefix: list[int], n_latents: int, eot_id: int, max_new_tokens: int,
                   eos_id: int) -> list[int]:
    """Batch-1 generation without a KV cache, as Coconut's reference `generate` does it
    (facebookresearch/coconut coconut.py:201-257): the latents by the multi-pass algorithm, then
    every new token re-runs the whole sequence. Its stop rule too: the first token is kept
    whatever it is (an eos there does not stop generation); a later eos stops it and is not kept.
    simcot's decoding stops at the first eos, the first token included (README: where simcot differs)."""
    stack = body(model.lm)
    head_ = model.lm.get_output_embeddings()
    emb = model.lm.get_input_embeddings()
    dev = next(model.parameters()).device
    embeds = emb(torch.tensor([prefix], device=dev))
    for _ in range(n_latents):
        h = stack(inputs_embeds=embeds).last_hidden_state[:, -1]
        embeds = torch.cat([embeds, _feedback(model, h)[:, None]], 1)
    embeds = torch.cat([embeds, emb(torch.tensor([[eot_id]], device=dev))], 1)
    out = []
    for t in range(max_new_tokens):
        tok = int(head_(stack(inputs_embeds=embeds).last_hidden_state[:, -1]).argmax(-1))
        if tok == eos_id and t > 0:
            break
        out.append(tok)
        embeds = torch.cat([embeds, emb(torch.tensor([[tok]], device=dev))], 1)
    return out
