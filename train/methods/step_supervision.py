"""SIM-CoT's step-level supervision, shared by SIM-CoT on Coconut and on CODI.

Alignment of explicit steps to latent slots (one slot = one latent for CODI, a group of c latents
for Coconut): the first slots get one step each; when there are more steps than slots the rest
are merged into the last slot; slots without a step get a filler (Coconut: the answer as a
pseudo-step) or no loss (CODI). Every slot of every sample goes through the decoder in **one**
batched forward (the reference runs a Python loop per slot).

A slot's target is its step's text without the trailing step separator, then eos: both
references decode the ``<<…>>`` span and the end marker (merged steps keep the separators
between them, as the Coconut fork joins them with ``\n``). Steps are not truncated unless
``simcot.max_step_tokens`` says so (the references never truncate).

Normalisation, per slot index g, then the mean over slot indices that have targets:
- ``sequence`` (Coconut fork): summed token NLL of the rows at g / number of such rows;
- ``token`` (CODI fork): token-mean NLL over the rows at g.
"""

from __future__ import annotations

from functools import cached_property

import torch

from simcot.kernels import fused_linear_cross_entropy, gathered
from simcot.models.loading import is_random_init
from simcot.models.step_decoder import StepDecoder
from simcot.train.config import ConfigError
from simcot.train.methods.base import IGNORE, right_pad
from simcot.train.data.tokenizer import STEP_SEP


def align_steps(steps: list[list[int]], n_slots: int, filler: list[int] | None) -> list[list[int] | None]:
    """Targets of each slot (None = no loss for that slot)."""
    if n_slots <= 0:
        return []
    if len(steps) > n_slots:
        merged = [t for s in steps[n_slots - 1:] for t in s]
        return [list(s) for s in steps[: n_slots - 1]] + [merged]
    return [list(s) for s in steps] + [filler] * (n_slots - len(steps))


class StepTargets:
    """A step's decoder target: its tokens without the trailing separator ``\n``. A last token
    that merges text and separator (LLaMA-3's ``'>>\n'``) is replaced by the text's own tokens,
    as the Coconut fork splits ``'>>\n'`` into ``'>>'``, ``'\n'`` (coconut.py:533-549)."""

    def __init__(self, tok):
        self.tok = tok
        self._last: dict[int, list[int] | None] = {}  # token id -> its tokens without the separator

    def __call__(self, ids: list[int]) -> list[int]:
        if not ids or self.tok is None:
            return ids
        last = ids[-1]
        if last not in self._last:
            text = self.tok.decode([last])
            self._last[last] = (self.tok.encode(text[: -len(STEP_SEP)], add_special_tokens=False)
                                if text.endswith(STEP_SEP) else None)
        bare = self._last[last]
        return ids if bare is None else ids[:-1] + bare


class StepSupervised:
    """What a SIM-CoT method adds to its base method's members (needs ``self.tok``)."""

    auxiliary_parts = ("step_decoder",)  # trained, never evaluated with

    @cached_property
    def step_targets(self) -> StepTargets:
        return StepTargets(self.tok)


def build_decoder(model, cfg, tok, restoring: bool = False, first_position: int = 0,
                  dropout: bool = True) -> StepDecoder:
    """The configured step decoder; ``copy_from=pretrained`` starts a copy decoder from the pretrained
    base model (the references' choice) instead of the main model's starting weights. When a
    checkpoint is about to overwrite the weights (`restoring`), the pretrained base is not loaded.
    `first_position` and `dropout` follow the method's reference fork (see StepDecoder)."""
    scfg = cfg.simcot
    kw = {"first_position": first_position, "dropout": dropout}
    if scfg.decoder == "copy" and scfg.copy_from == "pretrained" and not restoring:
        from simcot.models.loading import build_lm  # looked up per call: tests count the builds

        dtype = model.lm.get_input_embeddings().weight.dtype
        return StepDecoder("copy", model.lm, scfg, copy_of=build_lm(cfg.model, tok, dtype), **kw)
    return StepDecoder(scfg.decoder, model.lm, scfg, **kw)


def validate_decoder(cfg) -> None:
    if cfg.simcot.decoder == "copy" and cfg.simcot.copy_from == "pretrained" and is_random_init(cfg.model):
        raise ConfigError(f"simcot.copy_from=pretrained needs pretrained weights, but model '{cfg.model.name}' is "
                          f"randomly initialised (set model.pretrained, or use simcot.copy_from=init)")


Row = tuple[int, int, list[int]]  # (sample, slot index g, target tokens); latents g*c .. g*c+c-1


def truncate(target: list[int], max_tokens: int) -> list[int]:
    """`target` cut to `max_tokens` (0: whole)."""
    return target[:max_tokens] if max_tokens > 0 else target


def decoder_batch(rows: list[Row], group: int, eos: int, pad: int, max_tokens: int) -> dict:
    """Tensors for the decoder pass. Row (i, g, target) reads latents [g*c, (g+1)*c) of sample i;
    targets are cut to `max_tokens` (0: whole) and get eos.

    With no rows a dummy row without targets is added, so every step makes exactly one decoder
    forward (under ZeRO-3 every rank must run the same passes).
    """
    dummy = not rows
    if dummy:
        rows = [(0, 0, [])]
    targets = [truncate(t, max_tokens) + [eos] for _, _, t in rows]
    labels = [[IGNORE] * len(t) if dummy else t for t in targets]
    return {"dec_ids": right_pad(targets, pad), "dec_mask": right_pad([[1] * len(t) for t in targets], 0),
            "dec_labels": right_pad(labels, IGNORE), "dec_sample": torch.tensor([i for i, _, _ in rows]),
            "dec_index": torch.tensor([g * group for _, g, _ in rows])[:, None] + torch.arange(group)[None],
            "dec_slot": torch.tensor([g for _, g, _ in rows]), "dec_dummy": torch.tensor([dummy] * len(rows)),
            "dec_slots": 1 + max(g for _, g, _ in rows)}


def gather_prefix(table: torch.Tensor, sample: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(R, c, H) latents of each row from `table` (B, S, H); missing slots (dummy rows) read zeros."""
    width = int(index.max()) + 1 if index.numel() else 0
    if table.shape[1] < width:
        table = torch.cat([table, table.new_zeros(table.shape[0], width - table.shape[1], table.shape[2])], 1)
    return table[sample[:, None], index]


def decoder_loss(model, table: torch.Tensor, batch: dict, normalization: str) -> torch.Tensor:
    """The step-decoder loss; `table` (B, S, H) holds each sample's latents (differentiable)."""
    dec: StepDecoder = model.step_decoder
    prefix = gather_prefix(table, batch["dec_sample"], batch["dec_index"])
    prefix = torch.where(batch["dec_dummy"][:, None, None], torch.zeros_like(prefix), prefix)
    hidden = dec.hidden(model.lm, prefix, batch["dec_ids"], batch["dec_mask"])
    c = prefix.shape[1]
    dec_labels = batch["dec_labels"]  # (R, S); the prefix's c positions are unsupervised (c may exceed S)
    labels = torch.cat([dec_labels.new_full((dec_labels.shape[0], c), IGNORE), dec_labels], 1)
    # the last latent predicts the first step token: shift over [latents, tokens]
    h, y = hidden[:, :-1], labels[:, 1:]
    keep = y != IGNORE  # (R, c + S - 1): the latent-prefix positions and the padding never reach the head
    out = dec.output_head(model.lm)
    with gathered(out.weight, out.bias):  # the head is read outside its module: ZeRO-3 keeps only a shard
        tok_nll = fused_linear_cross_entropy(h[keep], out.weight, y[keep], bias=out.bias, reduction="none")  # (K,)
    row = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)[keep]  # (K,) each kept token's row
    nll = tok_nll.new_zeros(y.shape[0]).index_add(0, row, tok_nll)  # (R,)
    count = keep.sum(1).to(tok_nll.dtype)
    slots = batch["dec_slots"]
    slot = batch["dec_slot"]
    slot_nll = nll.new_zeros(slots).index_add(0, slot, nll)
    slot_tokens = nll.new_zeros(slots).index_add(0, slot, count)
    slot_rows = nll.new_zeros(slots).index_add(0, slot, (count > 0).to(nll.dtype))
    denom = slot_rows if normalization == "sequence" else slot_tokens
    present = (slot_rows > 0).to(nll.dtype)
    per_slot = slot_nll / denom.clamp(min=1)
    return (per_slot * present).sum() / present.sum().clamp(min=1)


def _row_prefix(table: torch.Tensor, rows: list[Row], group: int) -> torch.Tensor:
    dev = table.device
    sample = torch.tensor([i for i, _, _ in rows], device=dev)
    index = torch.tensor([g * group for _, g, _ in rows], device=dev)[:, None] + torch.arange(group, device=dev)
    return gather_prefix(table, sample, index)


@torch.no_grad()
def step_match(model, table: torch.Tensor, rows: list[Row], group: int, tok, eos: int, pad: int,
               max_tokens: int) -> dict[str, float]:
    """Greedy-decode every slot and compare with its target step (exact match of the text); each
    decodes at most one token more than the longest target (cut to `max_tokens` when > 0) and eos."""
    if not rows:
        return {}
    targets = [truncate(t, max_tokens) for _, _, t in rows]
    out = model.step_decoder.generate(model.lm, _row_prefix(table, rows, group), max(map(len, targets)) + 1, eos, pad)
    hits: dict[int, list[float]] = {}
    for (_, g, _), target, ids in zip(rows, targets, out.tolist()):
        ids = ids[: ids.index(eos)] if eos in ids else ids
        hits.setdefault(g, []).append(float(tok.decode(ids).strip() == tok.decode(target).strip()))
    metrics = {f"decoder_step_match/slot_{g}": sum(v) / len(v) for g, v in sorted(hits.items())}
    metrics["decoder_step_match"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return metrics


@torch.no_grad()
def decode_texts(model, table: torch.Tensor, rows: list[Row], group: int, tok, eos: int, pad: int,
                 max_tokens: int) -> list[str]:
    """Decoded text of each row's latent group (for `simcot decode`), at most `max_tokens` tokens."""
    out = model.step_decoder.generate(model.lm, _row_prefix(table, rows, group), max_tokens, eos, pad)
    return [tok.decode(ids[: ids.index(eos)] if eos in ids else ids).strip() for ids in out.tolist()]
