"""The rollout's latent feedback makes no embedding gradient: rows that are done feed the pad
embedding into masked slots, a provably zero gradient, so no latent step's backward builds a dense
V x H tensor; every gradient equals the one with the embedding branch differentiated."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import Created

from simcot.kernels import latent_feedback, latent_feedback_reference
from simcot.models import rollout
from simcot.models.decoding import left_pad
from simcot.models.latent_lm import LatentLM
from simcot.models.presets import PRESETS
from simcot.models.projection import LatentProjection
from simcot.models.rollout import continue_tokens, feedback_params, run_latents
from simcot.train.methods.base import IGNORE, right_pad, shifted_ce

lf = importlib.import_module("simcot.kernels.latent_feedback")  # the package re-exports a function by that name
V, H, PAD, BOT, EOT = 40, 32, 0, 2, 3




def _model(projection: bool) -> LatentLM:
    torch.manual_seed(0)
    cfg = PRESETS["tiny-llama"].hf_config(vocab_size=V, hidden_size=H, num_layers=2, num_heads=2)
    cfg.pad_token_id = PAD
    cfg.tie_word_embeddings = False
    lm = AutoModelForCausalLM.from_config(cfg)
    return LatentLM(lm, LatentProjection(H) if projection else None)


def _loss(model):
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(5, V, (n,), generator=g).tolist()  # noqa: E731
    prefixes = [rnd(4) + [BOT], rnd(7) + [BOT], rnd(2) + [BOT]]
    n_latents = torch.tensor([3, 0, 1])  # ragged: rows finish at different steps, one never thinks
    conts = [[EOT] + rnd(4), [EOT] + rnd(3), [EOT] + rnd(5)]
    ids, mask = left_pad(prefixes, PAD)
    ro = run_latents(model, ids, mask, n_latents, 3)
    out = continue_tokens(model, ro, right_pad(conts, PAD), right_pad([[1] * len(c) for c in conts], 0))
    return shifted_ce(model.lm, out.last_hidden_state, right_pad([[IGNORE] + c[1:] for c in conts], IGNORE))


@pytest.mark.parametrize("projection", [False, True], ids=["coconut", "codi"])
def test_latent_steps_make_no_embedding_gradient_and_change_no_gradient(monkeypatch, projection):
    model = _model(projection)
    calls = []
    real_bwd = lf.epilogue_bwd_torch

    def spy(*args):
        calls.append(args[-1])  # want_emb: whether the step differentiates its embedding branch
        return real_bwd(*args)

    monkeypatch.setattr(lf, "epilogue_bwd_torch", spy)
    model.zero_grad()
    _loss(model).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == [False] * 3  # three latent steps, none builds a V x H embedding gradient

    def differentiated(model, h, thinking, pad_ids):  # the former feedback: the embedding branch on autograd
        emb = model.lm.get_input_embeddings().weight
        return latent_feedback_reference(h, thinking, pad_ids, emb, **feedback_params(model))

    monkeypatch.setattr(rollout, "feed_back", differentiated)
    model.zero_grad()
    _loss(model).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and "lm.model.embed_tokens.weight" in got
    for n in got:  # the pad rows' gradient was exactly zero: dropping it changes nothing
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_detached_embedding_allocates_no_weight_sized_gradient(impl):
    """The op's side: with no gradient wanted for the embedding, its backward makes nothing V x H
    (with one wanted, the same call makes the dense V x H gradient of nn.Embedding)."""
    g = torch.Generator().manual_seed(0)
    v, h = 300, 24
    hidden = torch.randn(6, h, generator=g, requires_grad=True)
    emb = torch.randn(v, h, generator=g, requires_grad=True)
    thinking = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    ids = torch.full((6,), PAD)
    norm = (torch.ones(h, requires_grad=True), torch.zeros(h, requires_grad=True), 1e-5)
    for wanted in (True, False):
        e = emb if wanted else emb.detach()
        out = latent_feedback(hidden, thinking, ids, e, norm=norm, impl=impl)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        with Created() as probe:
            grads = torch.autograd.grad(out, [hidden, *norm[:2]] + ([emb] if wanted else []), up)
        assert ((v, h) in probe.shapes) == wanted
        ref = latent_feedback_reference(hidden, thinking, ids, e, norm=norm)
        for a, r in zip(grads, torch.autograd.grad(ref, [hidden, *norm[:2]] + ([emb] if wanted else []), up)):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
