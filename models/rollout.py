"""The batched continuous-thought rollout, shared by every latent method, in training and eval.

Layout of a batch (prefixes left-padded so every row's ``<bot>`` sits in the same column)::

    [pad .. pad  question  <bot>] [slot 0] [slot 1] .. [slot L-1] [<eot> continuation ...]
     prefix: one forward, KV cache    one single-position forward     one forward on the cache
                                      per latent step, whole batch

Row i thinks for ``n_i <= L`` steps. At step j the rows with ``j >= n_i`` are done: their slot
gets attention-mask 0 (no later position sees it) and their position id does not advance, so
the continuation of every row is positioned exactly as if it had no padding slots at all. This
replaces per-sample Python loops with masks, and the loop count depends only on L (a Python
int known when the batch is collated), so there is no host sync inside it.

A latent is the last-layer hidden state (after the final norm) at the previous position, passed
through the method's feedback (identity for Coconut, the projection MLP for CODI) and fed as the
next input embedding. Nothing is detached: gradients flow through every latent step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simcot.kernels import latent_feedback
from simcot.models.decoding import (CACHE_CHUNK, Prefill, StepMasks, attention_as, body, body_step, by_length,
                                    cache_of, compiled_step, head, positions, prefix_groups, ready_masks,
                                    reserved_masks, unwrap, with_cache)
from simcot.models.tanh_gelu import cpu_tanh_gelu
from simcot.parallel import is_partitioned, rank_max


@dataclass
class Rollout:
    cache: object  # KV cache holding prefix + latent slots
    mask: torch.Tensor  # (B, P + L) attention mask over the cache
    next_pos: torch.Tensor  # (B,) position id of each row's next token
    fed: list[torch.Tensor]  # L tensors (B, H): the embeddings fed at the latent slots
    thinking: torch.Tensor  # (B, L) bool: slot j of row i is a real latent
    h_final: torch.Tensor  # (B, H) hidden state after each row's last latent (at <bot> when n_i = 0)
    attend: StepMasks | None = None  # reserved cache: the attention and 4-D masks of one-position steps

    @property
    def latents(self) -> torch.Tensor:
        """(B, L, H): the fed latents, stacked (differentiable: the step decoder reads them)."""
        if not self.fed:
            return self.h_final.new_zeros(self.h_final.shape[0], 0, self.h_final.shape[1])
        return torch.stack(self.fed, 1)


def feed_back(model, h: torch.Tensor, thinking: torch.Tensor, pad_ids: torch.Tensor) -> torch.Tensor:
    """Next input embeddings: the method's latent epilogue where `thinking`, the pad embedding elsewhere.

    A row that is not thinking is done: its slot is masked (no later position attends to it) and
    no loss reads its fed value (readers of ``Rollout.latents`` take each row's thinking slots
    only), so the pad embedding there has a zero gradient by construction.
    It is therefore fed without one (a detached weight): the backward of a latent step makes no
    dense V x H embedding gradient (1 GiB of zero-fill per step at V=128k, H=4096 in bf16).

    Under ZeRO-3 the weights exist only inside their modules' forward (and are gathered again for
    their backward), so the modules are called; otherwise the fused latent-feedback op runs.
    """
    emb = model.lm.get_input_embeddings()
    if is_partitioned(emb.weight):
        latent = model.projection(h) if getattr(model, "projection", None) is not None else h
        with torch.no_grad():
            pad = emb(pad_ids)
        return torch.where(thinking[:, None], latent, pad.to(latent.dtype))
    return latent_feedback(h, thinking, pad_ids, emb.weight.detach(), **feedback_params(model))


def feedback_params(model) -> dict:
    """The projection/norm tensors of a model's latent feedback, in latent_feedback's format."""
    proj = getattr(model, "projection", None)
    return proj.feedback_args() if proj is not None else {}


def run_latents(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, n_latents: torch.Tensor,
                max_latents: int, groups: int = 1, room: int = 0, step=None) -> Rollout:
    """Prefix forward with a cache, then `max_latents` single-position latent steps for the batch.

    `n_latents` (B,) on the model's device; `max_latents` a Python int (>= n_latents.max()).
    Evaluation (no gradients): `groups` > 1 runs the prefix in that many length groups
    (`decoding.by_length`), and `room` > 0 reserves the cache at the prefix for the latents plus
    `room` more positions, so no step copies it (transformers' cache makes a new one per step);
    `step` is the latent steps' forward (`decoding.body_step`, the default, or its compiled form).
    """
    stack = body(model.lm)
    step = body_step(model.lm) if step is None else step
    dtype = model.lm.get_input_embeddings().weight.dtype
    max_latents = rank_max(max_latents)
    pos = positions(prefix_mask)

    def forward(i, m, p):
        out = stack(input_ids=i, attention_mask=m, position_ids=p, use_cache=True)
        return out.last_hidden_state[:, -1], cache_of(out)

    # 0: transformers' own cache (no room asked, or an attention that takes no ready 4-D masks)
    capacity = prefix_ids.shape[1] + max_latents + room if room and ready_masks(model.lm) else 0
    h, cache = by_length(forward, prefix_ids, prefix_mask, pos, groups, capacity)
    attend = reserved_masks(model.lm, cache, capacity, dtype) if capacity else None
    mask, next_pos = prefix_mask, pos[:, -1] + 1
    h_final = h
    pad_ids = torch.full_like(n_latents, model.lm.config.pad_token_id or 0)
    fed, thinking_all = [], []
    with attention_as(model.lm, attend.impl if attend else None):  # the steps' attention, then the model's own
        for j in range(max_latents):
            thinking = n_latents > j
            e = feed_back(model, h, thinking, pad_ids)
            mask = torch.cat([mask, thinking.to(mask.dtype)[:, None]], dim=1)
            h = step(e[:, None].to(dtype), cache, attention_mask=attend(mask) if attend else mask,  # (B, H)
                     position_ids=next_pos[:, None])  # the cache grows in place
            h_final = torch.where(thinking[:, None], h, h_final)
            next_pos = next_pos + thinking.long()
            fed.append(e)
            thinking_all.append(thinking)
    thinking_t = (torch.stack(thinking_all, 1) if thinking_all
                  else torch.zeros(h.shape[0], 0, dtype=torch.bool, device=h.device))
    return Rollout(cache, mask, next_pos, fed, thinking_t, h_final, attend)


def continue_tokens(model, ro: Rollout, ids: torch.Tensor, mask: torch.Tensor, output_hidden_states: bool = False):
    """One forward of right-padded tokens on the rollout's cache (teacher forcing)."""
    full_mask = torch.cat([ro.mask, mask], dim=1)
    if ro.attend is not None:  # a reserved cache (evaluation's): one position at a time
        assert ids.shape[1] == 1, "a reserved rollout cache continues one token per forward"
        full_mask = ro.attend(full_mask)
    pos = ro.next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]
    stack = body(model.lm)
    with attention_as(model.lm, ro.attend.impl if ro.attend is not None else None):
        return stack(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                     output_hidden_states=output_hidden_states, **with_cache(stack, ro.cache))


@torch.no_grad()
def prefill_latents(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, n_latents: torch.Tensor,
                    max_latents: int, eot_id: int, compile: bool = False) -> tuple[Prefill, Rollout]:
    """Evaluation: prefix, latents, then ``<eot>``; returns the state greedy decoding continues from.
    `compile`: the latent steps and ``<eot>`` run through torch.compile (`compiled_step(kind="body")`)."""
    step = compiled_step(model.lm, kind="body") if compile else body_step(model.lm)
    with cpu_tanh_gelu(unwrap(model.lm), prefix_ids.device):
        ro = run_latents(model, prefix_ids, prefix_mask, n_latents, max_latents,
                         prefix_groups(model.lm, prefix_ids.shape[0]), room=1 + CACHE_CHUNK, step=step)
        eot = torch.full((prefix_ids.shape[0], 1), eot_id, dtype=torch.long, device=prefix_ids.device)
        mask = torch.cat([ro.mask, torch.ones_like(eot)], 1)  # (B, T + 1)
        with attention_as(model.lm, ro.attend.impl if ro.attend is not None else None):
            h = step(model.lm.get_input_embeddings()(eot), ro.cache,  # (B, H): the <eot> step, as a latent one
                     attention_mask=ro.attend(mask) if ro.attend is not None else mask,
                     position_ids=ro.next_pos[:, None])
    state = Prefill(head(model.lm)(h), ro.cache, mask, ro.next_pos + 1)
    return state, ro
