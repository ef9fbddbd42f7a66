"""The step-decoder loss sends only supervised positions to the fused cross-entropy (as
``shifted_ce`` does) and keeps the value and the gradients of the per-position formulation."""

import random

import pytest
import torch

from simcot.kernels import fused_linear_cross_entropy, gathered
from simcot.models.rollout import run_latents
from simcot.train.methods import step_supervision
from simcot.train.methods.base import IGNORE
from simcot.train.runner import build

LATENT = {"coconut.c_thought": 2, "coconut.max_latent_stage": 2, "coconut.epochs_per_stage": 1,
          "codi.n_latents": 2}


def loss_over_every_position(model, table, batch, normalization):
    """The former decoder loss: a per-token CE at every position (latent prefix and padding
    included, masked afterwards), then the same slot normalisation."""
    dec = model.step_decoder
    prefix = step_supervision.gather_prefix(table, batch["dec_sample"], batch["dec_index"])
    prefix = torch.where(batch["dec_dummy"][:, None, None], torch.zeros_like(prefix), prefix)
    hidden = dec.hidden(model.lm, prefix, batch["dec_ids"], batch["dec_mask"])
    c = prefix.shape[1]
    labels = torch.cat([torch.full_like(batch["dec_ids"][:, :c], IGNORE), batch["dec_labels"]], 1)
    h, y = hidden[:, :-1], labels[:, 1:]
    out = dec.output_head(model.lm)
    with gathered(out.weight, out.bias):
        per_tok = fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), out.weight, y.reshape(-1), bias=out.bias,
                                             reduction="none").view_as(y)
    valid = (y != IGNORE).to(per_tok.dtype)
    nll, count = (per_tok * valid).sum(1), valid.sum(1)
    slots, slot = batch["dec_slots"], batch["dec_slot"]
    slot_nll = per_tok.new_zeros(slots).index_add(0, slot, nll)
    slot_tokens = per_tok.new_zeros(slots).index_add(0, slot, count)
    slot_rows = per_tok.new_zeros(slots).index_add(0, slot, (count > 0).to(per_tok.dtype))
    denom = slot_rows if normalization == "sequence" else slot_tokens
    present = (slot_rows > 0).to(per_tok.dtype)
    return (slot_nll / denom.clamp(min=1) * present).sum() / present.sum().clamp(min=1)


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_only_supervised_positions_reach_the_head_and_nothing_else_changes(tiny, tmp_path, monkeypatch, norm):
    cfg, _ = tiny(method="simcot-coconut", **LATENT, **{"simcot.normalization": norm, "simcot.decoder": "small",
                                                        "simcot.small_layers": 1})
    b = build(cfg, tmp_path)
    batch = b.method.collate(b.examples["train"][:5], 6, random.Random(0))
    rows_seen = []
    real = step_supervision.fused_linear_cross_entropy

    def spy(hidden, *args, **kw):
        rows_seen.append(hidden.shape[0])
        return real(hidden, *args, **kw)

    results = []
    for fn in (step_supervision.decoder_loss, loss_over_every_position):
        b.model.zero_grad()
        monkeypatch.setattr(step_supervision, "fused_linear_cross_entropy", spy)
        ro = run_latents(b.model, batch["prefix_ids"], batch["prefix_mask"], batch["n_latents"], batch["max_latents"])
        loss = fn(b.model, ro.latents, batch, norm)
        loss.backward()
        monkeypatch.undo()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in b.model.named_parameters()
                                        if p.grad is not None}))
    supervised = int((batch["dec_labels"] != IGNORE).sum())  # each label is predicted by exactly one position
    every_position = batch["dec_ids"].shape[0] * (batch["dec_index"].shape[1] + batch["dec_ids"].shape[1] - 1)
    assert 0 < supervised < every_position
    assert rows_seen == [supervised]  # before: every position, latent prefix and padding included
    (got, g_got), (want, g_want) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert g_got.keys() == g_want.keys() and any(n.startswith("step_decoder.") for n in g_got)
    for n in g_got:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_batch_without_targets_gives_zero_loss_and_finite_gradients(tiny, tmp_path):
    """The dummy row (no step has a slot): no position is supervised, the CE sees zero rows."""
    cfg, _ = tiny(method="simcot-coconut", **LATENT, **{"simcot.decoder": "small", "simcot.small_layers": 1})
    b = build(cfg, tmp_path)
    batch = b.method.collate(b.examples["train"][:2], 6, random.Random(0))
    batch.update(step_supervision.decoder_batch([], 2, b.method.special.eos, b.method.special.pad, 8))
    ro = run_latents(b.model, batch["prefix_ids"], batch["prefix_mask"], batch["n_latents"], batch["max_latents"])
    loss = step_supervision.decoder_loss(b.model, ro.latents, batch, "sequence")
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in b.model.parameters() if p.grad is not None)
