"""The batched rollout equals the naive multi-pass algorithm: loss and every gradient (fp64).

Tolerance: 1e-6, relative (gradients compared by norm of the difference). GPT-2 agrees to
~1e-16; LLaMA's RMSNorm computes in fp32 even inside an fp64 model, which turns reduction-order
differences of 1e-16 into fp32 ulps, so its gradients agree to ~3e-8.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from simcot.models.decoding import left_pad
from simcot.models.latent_lm import LatentLM
from simcot.models.presets import PRESETS
from simcot.models.projection import LatentProjection
from simcot.models.rollout import continue_tokens, run_latents
from simcot.models.step_attention import STEP_ATTENTION
from simcot.models.rollout_reference import multipass_hidden, per_sample_hidden
from simcot.train.methods.base import IGNORE, right_pad, shifted_ce

V, PAD, BOT, EOT = 40, 0, 2, 3


def _model(family: str, projection: bool, init_std: float | None = None) -> LatentLM:
    torch.manual_seed(0)
    cfg = PRESETS[family].hf_config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2)
    if init_std is not None:
        cfg.initializer_range = init_std
    cfg.pad_token_id = PAD
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    return LatentLM(lm, LatentProjection(32).double() if projection else None)


def _batch():
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(5, V, (n,), generator=g).tolist()  # noqa: E731
    prefixes = [rnd(4) + [BOT], rnd(7) + [BOT], rnd(2) + [BOT], rnd(5) + [BOT]]
    n_latents = [3, 0, 5, 2]  # ragged, one sample with none
    conts = [[EOT] + rnd(6), [EOT] + rnd(3), [EOT] + rnd(8), [EOT] + rnd(1)]
    labels = [[IGNORE] + c[1:] for c in conts]
    labels[0][3] = IGNORE  # an ignored token inside a target
    return prefixes, n_latents, conts, labels


def _batched_loss(model, prefixes, n_latents, conts, labels):
    ids, mask = left_pad(prefixes, PAD)
    ro = run_latents(model, ids, mask, torch.tensor(n_latents), max(n_latents))
    out = continue_tokens(model, ro, right_pad(conts, PAD), right_pad([[1] * len(c) for c in conts], 0))
    return shifted_ce(model.lm, out.last_hidden_state, right_pad(labels, IGNORE))


def _reference_loss(model, prefixes, n_latents, conts, labels):
    head = model.lm.get_output_embeddings()
    total, count = 0.0, 0
    for p, n, c, lab in zip(prefixes, n_latents, conts, labels):
        h = per_sample_hidden(model, p, n, c)
        y = torch.tensor(lab[1:])
        logits = head(h[:-1])
        keep = y != IGNORE
        total = total + torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("projection", [False, True], ids=["coconut", "codi"])
def test_batched_rollout_matches_per_sample_multipass(family, projection):
    model = _model(family, projection)
    batch = _batch()
    loss = _batched_loss(model, *batch)
    ref = _reference_loss(model, *batch)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-9), (loss.item(), ref.item())
    g, g_ref = _grads(model, loss), _grads(model, _reference_loss(model, *batch))
    assert g.keys() == g_ref.keys()
    if projection:
        assert any(k.startswith("projection.") for k in g)  # the latent path reaches the projection
    for k in g:
        rel = (g[k] - g_ref[k]).norm() / g_ref[k].norm().clamp(min=1e-30)
        assert rel < 1e-6, (k, rel.item())


def test_batched_multipass_reference_agrees_with_per_sample():
    model = _model("tiny-llama", True)
    prefixes, n_latents, conts, labels = _batch()
    ids, mask = left_pad(prefixes, PAD)
    cont = right_pad(conts, PAD)
    h = multipass_hidden(model, ids, mask, torch.tensor(n_latents), max(n_latents), cont,
                         right_pad([[1] * len(c) for c in conts], 0))
    for i, (p, n, c) in enumerate(zip(prefixes, n_latents, conts)):
        assert torch.allclose(h[i, : len(c)], per_sample_hidden(model, p, n, c), rtol=1e-6, atol=1e-9)


def test_gradients_flow_through_every_latent_step():
    model = _model("tiny-llama", False)
    ids, mask = left_pad([[5, 6, BOT]], PAD)
    ro = run_latents(model, ids, mask, torch.tensor([4]), 4)
    for e in ro.fed:
        e.retain_grad()
    out = continue_tokens(model, ro, torch.tensor([[EOT, 7, 8]]), torch.ones(1, 3, dtype=torch.long))
    shifted_ce(model.lm, out.last_hidden_state, torch.tensor([[IGNORE, 7, 8]])).backward()
    per_step = torch.stack([e.grad[0].norm() for e in ro.fed])
    assert (per_step > 0).all(), per_step  # no detach anywhere in the chain


def test_batched_latent_generation_equals_batch1_generation_without_cache():
    from simcot.models.decoding import greedy_decode, trim_at_eos
    from simcot.models.rollout import prefill_latents
    from simcot.models.rollout_reference import naive_generate

    model = _model("tiny-llama", True)
    with torch.no_grad():  # sharper weights: greedy outputs that vary (at init every row repeats one token)
        for p in model.lm.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
    prefixes, n_latents, _, _ = _batch()
    ids, mask = left_pad(prefixes, PAD)
    state, _ = prefill_latents(model, ids, mask, torch.tensor(n_latents), max(n_latents), EOT)
    free = greedy_decode(model.lm, state, 10, eos_id=-1, pad_id=PAD)  # no eos: 10 tokens each
    for i, (p, n) in enumerate(zip(prefixes, n_latents)):
        assert free[i].tolist() == naive_generate(model, p, n, EOT, 10, eos_id=-1)
    # eos = a row's 3rd token: both stop there (the reference keeps no eos); eos = its 1st token:
    # the reference keeps it and goes on, simcot stops (README: where simcot differs)
    checked = 0
    for i, (p, n) in enumerate(zip(prefixes, n_latents)):
        for at in (2, 0):
            eos = int(free[i, at])
            state, _ = prefill_latents(model, ids[i:i + 1], mask[i:i + 1], torch.tensor([n]), n, EOT)
            ours = trim_at_eos(greedy_decode(model.lm, state, 10, eos_id=eos, pad_id=PAD)[0].tolist(), eos)
            ref = naive_generate(model, p, n, EOT, 10, eos_id=eos)
            first = free[i].tolist().index(eos)
            assert ours == free[i, :first].tolist()
            assert ref == (ours if first > 0 else [eos] + trim_at_eos(free[i, 1:].tolist(), eos))
            checked += first == 0 and len(ref) > 1
    assert checked  # a row whose reference output goes on past a first-token eos


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("group_rows", [32, 1])  # the prefix in one forward; one row per length group
def test_batched_generation_drops_finished_rows_and_equals_generation_without_cache(family, group_rows, monkeypatch):
    """Left padding, latent counts 3/0/5/2, rows ending at different steps (so the decode loop drops
    finished rows mid-way): every row equals Coconut's batch-1 generate without a cache."""
    from simcot.models import decoding
    from simcot.models.decoding import greedy_decode

    monkeypatch.setattr(decoding, "GROUP_ROWS", group_rows)
    from simcot.models.rollout import prefill_latents
    from simcot.models.rollout_reference import naive_generate

    model = _model(family, True, init_std=0.2)  # at 0.02 a tiny tied model echoes one token forever
    prefixes, n_latents, _, _ = _batch()
    free = [naive_generate(model, p, n, EOT, 10, eos_id=-1) for p, n in zip(prefixes, n_latents)]
    eos = max(sorted({t for r in free for t in r}), key=lambda t: len({r.index(t) if t in r else -1 for r in free}))
    refs = [r[:r.index(eos) + 1] if eos in r else r for r in free]  # simcot stops at any eos and keeps it
    assert len({len(r) for r in refs}) > 1
    ids, mask = left_pad(prefixes, PAD)
    state, _ = prefill_latents(model, ids, mask, torch.tensor(n_latents), max(n_latents), EOT)
    out = greedy_decode(model.lm, state, 10, eos_id=eos, pad_id=PAD)
    for row, ref in zip(out.tolist(), refs):
        assert row[: len(ref)] == ref and all(t == PAD for t in row[len(ref):])


def test_mlp_checkpointing_keeps_the_rollout_exact():
    from simcot.models.checkpointing import checkpoint_mlps

    batch = _batch()
    plain = _model("tiny-llama", True)
    ckpt = _model("tiny-llama", True)
    assert checkpoint_mlps(ckpt.lm) == 2
    calls = []
    ckpt.lm.model.layers[0].mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))
    l1, l2 = _batched_loss(plain, *batch), _batched_loss(ckpt, *batch)
    assert torch.equal(l1, l2)
    forward_calls = len(calls)  # prefix + 5 latent steps + continuation
    g1, g2 = _grads(plain, l1), _grads(ckpt, l2)
    # recomputed in backward (torch stops the recompute early, once it has what backward needs)
    assert len(calls) == 2 * forward_calls == 14
    assert all(torch.allclose(g1[k], g2[k], rtol=1e-12, atol=1e-15) for k in g1)


def test_evaluation_reserves_the_cache_at_the_prefix():
    """The latent steps, <eot> and up to CACHE_CHUNK answer tokens write into the buffers reserved
    right after the prefix: no step makes a new cache (transformers' cache concatenates per step)."""
    from simcot.models import decoding
    from simcot.models.rollout import prefill_latents

    model = _model("tiny-llama", True)
    prefixes, n_latents, _, _ = _batch()
    ids, mask = left_pad(prefixes, PAD)
    made = []
    grow = decoding.ReservedLayer.grow
    try:
        decoding.ReservedLayer.grow = lambda self, cap: (made.append(cap) if cap > self.keys.shape[-2] else None,
                                                         grow(self, cap))
        state, _ = prefill_latents(model, ids, mask, torch.tensor(n_latents), max(n_latents), EOT)
        layers = state.cache.layers
        assert all(type(layer) is decoding.ReservedLayer for layer in layers)
        width = ids.shape[1] + max(n_latents) + 1  # prefix, latents, <eot>
        assert [layer.length for layer in layers] == [width] * len(layers)
        buffers = [layer.keys.data_ptr() for layer in layers]
        decoding.greedy_decode(model.lm, state, decoding.CACHE_CHUNK, eos_id=-1, pad_id=PAD)
    finally:
        decoding.ReservedLayer.grow = grow
    assert made == [width + decoding.CACHE_CHUNK] * len(layers)  # one buffer per layer, made at the prefix
    assert [layer.keys.data_ptr() for layer in layers] == buffers


def test_evaluation_latent_steps_run_the_step_attention_and_training_the_models_own():
    """Evaluation's latent steps and <eot> are single-position forwards on a reserved cache: on the
    CPU they run the step attention (`models/step_attention.py`), as decoding's steps do (the
    CPU's sdpa kernel is slower for one query row); the prefix and every training forward keep
    the model's sdpa, restored after."""
    from simcot.models.rollout import prefill_latents

    model = _model("tiny-llama", True)
    stack = model.lm.get_decoder()
    prefixes, n_latents, conts, labels = _batch()
    ids, mask = left_pad(prefixes, PAD)
    seen = []
    hook = stack.register_forward_pre_hook(lambda m, a, kw: seen.append(
        (m.config._attn_implementation, (kw.get("input_ids") if kw.get("input_ids") is not None
                                         else kw["inputs_embeds"]).shape[1])), with_kwargs=True)
    try:
        prefill_latents(model, ids, mask, torch.tensor(n_latents), max(n_latents), EOT)
        evaluation, seen[:] = list(seen), []
        _batched_loss(model, prefixes, n_latents, conts, labels)
    finally:
        hook.remove()
    steps = [(STEP_ATTENTION, 1)] * (max(n_latents) + 1)  # latents, <eot>
    assert evaluation == [("sdpa", ids.shape[1])] + steps
    assert {impl for impl, _ in seen} == {"sdpa"}
    assert model.lm.config._attn_implementation == "sdpa"


def test_compiled_latent_steps_and_eot_generate_what_the_eager_ones_do(monkeypatch):
    """`--eval.compile` runs the latent steps and `<eot>` through the compiled body step, and the
    answer tokens through the compiled LM step (each traced here with "aot_eager"; inductor's code
    is the benchmark's business): same logits at `<eot>`, same tokens, every step compiled."""
    from simcot.models import decoding, rollout
    from simcot.models.decoding import greedy_decode
    from simcot.models.rollout import prefill_latents

    model = _model("tiny-llama", True, init_std=0.2)
    prefixes, n_latents, _, _ = _batch()
    ids, mask = left_pad(prefixes, PAD)
    n = torch.tensor(n_latents)
    want_state, _ = prefill_latents(model, ids, mask, n, max(n_latents), EOT)
    want = greedy_decode(model.lm, want_state, 10, eos_id=-1, pad_id=PAD)
    calls, real = [], decoding.compiled_step

    def traced(lm, backend="inductor", kind="lm"):
        step = real(lm, backend="aot_eager", kind=kind)
        return lambda *a, **k: calls.append(kind) or step(*a, **k)
    monkeypatch.setattr(rollout, "compiled_step", traced)
    monkeypatch.setattr(decoding, "compiled_step", traced)
    state, _ = prefill_latents(model, ids, mask, n, max(n_latents), EOT, compile=True)
    got = greedy_decode(model.lm, state, 10, eos_id=-1, pad_id=PAD, compile=True)
    assert calls == ["body"] * (max(n_latents) + 1) + ["lm"] * 9  # 5 latent steps, <eot>; 9 more tokens
    assert torch.allclose(state.logits, want_state.logits, rtol=0, atol=1e-12)
    assert torch.equal(got, want)
