"""The ops inside real training steps of a tiny LLaMA: every impl gives the unfused path's losses.

- LM loss: ``shifted_ce`` (the call every method makes) with the default impl forced to each
  path, against Hugging Face's own ``model(labels=...).loss`` (logits + F.cross_entropy), in
  fp32 (to 1e-5) and under bf16 autocast (to 2e-3: the bf16 rounding of dW differs).
- Latent rollout: a few latent thoughts fed back through ``latent_feedback`` (CODI projection),
  then the LM loss; the fused impls against the unfused reference, step by step.
"""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from simcot.kernels import default_impl, latent_feedback
from simcot.models.decoding import body
from simcot.models.presets import PRESETS
from simcot.train.methods.base import IGNORE, shifted_ce

STEPS = 3


def tiny_lm(vocab=64, tie=True):
    torch.manual_seed(0)
    cfg = PRESETS["tiny-llama"].hf_config(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2)
    cfg.tie_word_embeddings = tie
    return AutoModelForCausalLM.from_config(cfg)


def batch(vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[3, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :4] = IGNORE  # an unsupervised prompt
    return ids, mask, labels


def train(lm, loss_fn, autocast=False):
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as TorchEngine runs bf16
            loss = loss_fn(lm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tie,autocast,tol", [(True, False, 1e-5), (False, False, 1e-5), (True, True, 2e-3)],
                         ids=["tied", "untied", "tied-bf16-autocast"])
def test_shifted_ce_gives_the_unfused_losses(tie, autocast, tol):
    ids, mask, labels = batch()
    base = tiny_lm(tie=tie)

    def unfused(lm):
        return lm(input_ids=ids, attention_mask=mask, labels=labels).loss

    def fused(lm):
        return shifted_ce(lm, body(lm)(input_ids=ids, attention_mask=mask).last_hidden_state, labels)

    want = train(copy.deepcopy(base), unfused, autocast)
    assert want[-1] < want[0]
    for impl in ("reference", "torch", "triton"):
        lm = copy.deepcopy(base)
        with default_impl(impl):
            got = train(lm, fused, autocast)
        assert got == pytest.approx(want, rel=tol), impl


def test_latent_rollout_gives_the_unfused_losses():
    ids, mask, labels = batch()
    base = tiny_lm()
    h = base.config.hidden_size
    torch.manual_seed(2)
    base.projection = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h), nn.LayerNorm(h))
    # step s: which rows think (the others feed a token, as rows that left the latent mode do)
    thinking = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])

    def rollout_loss(lm, impl):
        emb = lm.get_input_embeddings()
        l1, _, l2, ln = lm.projection
        x = emb(ids[:, :4])
        for s in range(len(thinking)):
            last = body(lm)(inputs_embeds=x).last_hidden_state[:, -1]
            nxt = latent_feedback(last, thinking[s], tokens[s], emb.weight, proj=(l1.weight, l1.bias, l2.weight,
                                  l2.bias), norm=(ln.weight, ln.bias, ln.eps), impl=impl)
            x = torch.cat([x, nxt[:, None]], 1)
        x = torch.cat([x, emb(ids[:, 4:])], 1)
        lab = torch.cat([torch.full((4, len(thinking)), IGNORE), labels], 1)
        return shifted_ce(lm, body(lm)(inputs_embeds=x).last_hidden_state, lab)

    want = train(copy.deepcopy(base), lambda lm: rollout_loss(lm, "reference"))
    assert want[-1] < want[0]
    for impl in ("torch", "triton"):
        with default_impl(impl):  # the LM loss follows the same impl
            got = train(copy.deepcopy(base), lambda lm: rollout_loss(lm, impl))
        assert got == pytest.approx(want, rel=1e-5), impl
