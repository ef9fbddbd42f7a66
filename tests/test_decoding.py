"""The decode loop (left padding, reserved KV cache, ready 4-D masks, finished rows dropped from the
batch) equals plain one-sample-at-a-time generation without a cache, token for token, for plain
prompts, latent rollouts with mixed latent counts, and SIM-CoT's step decoder."""

import torch

import pytest

from simcot.models import decoding
from simcot.models.decoding import greedy_decode, left_pad, prefill_ids
from simcot.models.presets import PRESETS
from simcot.models.step_attention import STEP_ATTENTION
from transformers import AutoModelForCausalLM


def _model(name, attn="sdpa"):
    torch.manual_seed(0)
    cfg = PRESETS[name].hf_config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, attn_implementation=attn)
    cfg.initializer_range = 0.2  # at the default 0.02 a tiny tied model echoes its last token forever
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()


def _decode(model, prompts, n=12, eos_id=1):
    ids, mask = left_pad(prompts, pad_id=0)
    out = greedy_decode(model, prefill_ids(model, ids, mask), n, eos_id=eos_id, pad_id=0)
    return [row.tolist() for row in out]


def test_batched_equals_unbatched_for_llama_and_gpt2():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 9, 5, 1, 7)]
    for name in ("tiny-llama", "tiny-gpt2"):
        model = _model(name)
        batched = _decode(model, prompts)
        single = [_decode(model, [p])[0] for p in prompts]
        for b, s in zip(batched, single):
            assert b[: len(s)] == s and all(t == 0 for t in b[len(s):])


class _Scripted(torch.nn.Module):
    """A fake LM whose row r emits token 5 until its scripted step, then eos (1)."""

    def __init__(self, eos_at):
        super().__init__()
        self.eos_at, self.calls = eos_at, 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, **kw):
        step = self.calls
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 8)
        for r, at in enumerate(self.eos_at):
            logits[r, -1, 1 if step >= at else 5] = 1.0
        return type("Out", (), {"logits": logits, "past_key_values": None})()


def test_rows_stop_at_eos_pad_after_and_decoding_ends_when_all_are_done():
    lm = _Scripted(eos_at=[2, 0, 1])
    ids, mask = left_pad([[5, 6], [7], [2, 3, 4]], 0)
    out = greedy_decode(lm, prefill_ids(lm, ids, mask), 10, eos_id=1, pad_id=0)
    assert out.tolist() == [[5, 5, 1], [1, 0, 0], [5, 1, 0]]
    assert lm.calls == 3  # prefill + two steps: no forward after every row finished


def test_eval_metrics_average_over_the_batches_that_report_them():
    """A per-slot metric that only some batches have (no sample there has a step for that slot)
    is the mean over those batches' rows, not diluted by the batches without it."""
    from types import SimpleNamespace

    from simcot.models.decoding import Prefill
    from simcot.train.config import EvalConfig
    from simcot.train.evaluate import evaluate
    from simcot.train.methods.base import Prompt

    class Fake:
        special = SimpleNamespace(eos=1, pad=0)

        def eval_prompt(self, ex, epoch=None, n_latents=None):
            return Prompt([2] * ex["len"], 0, ex)

        def prefill(self, model, prompts, device):
            logits = torch.zeros(len(prompts), 4)
            logits[:, 1] = 1.0  # eos at once
            short = prompts[0].ex["len"] == 1  # the batch of short prompts reports slot_2, the other does not
            metrics = {"cos": 0.5, **({"slot_2": 0.25} if short else {})}
            return Prefill(logits, None, torch.ones(len(prompts), 1), torch.zeros(len(prompts)), metrics)

    examples = [{"len": 1 if i < 2 else 3, "answer": "7", "idx": i} for i in range(5)]
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "")
    model = torch.nn.Module()
    model.lm = torch.nn.Linear(1, 1)
    decoding.CPU_CACHE_BUFFERS.zeros((8,), torch.float32)  # a cache buffer left by earlier decoding
    decoding.STATIC_BUFFERS.take(torch.zeros(1, 1, 2, 4), 0, 0, 4, 2)  # and a static decode's (a GPU's)
    res = evaluate(model, Fake(), examples, tok, EvalConfig(batch_size=2, max_new_tokens=1), "### ",
                   "test", torch.device("cpu"))
    assert res.metrics == {"cos": 0.5, "slot_2": 0.25}
    assert decoding.CPU_CACHE_BUFFERS.flats == []  # evaluation hands its cache buffers back when it ends
    assert decoding.STATIC_BUFFERS.buffers == {}


def _no_cache(model, prompt, n, eos_id):
    """Greedy generation re-running the whole sequence per token: the plain definition."""
    ids, out = list(prompt), []
    for _ in range(n):
        tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        if tok == eos_id:
            break
        ids.append(tok)
    return out


def _common_token(rows: list[list[int]]) -> int:
    """The token that, as eos, ends the rows at the most different steps (some never)."""
    def spread(tok):
        return len({r.index(tok) if tok in r else -1 for r in rows})
    return max(sorted({t for r in rows for t in r}), key=spread)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("group_rows", [32, 2])  # the prompt in one forward; in four length groups
def test_decode_equals_generation_without_cache_rows_ending_at_different_steps(name, attn, group_rows, monkeypatch):
    monkeypatch.setattr(decoding, "CACHE_CHUNK", 4)  # the reserved cache grows twice within 12 tokens
    monkeypatch.setattr(decoding, "GROUP_ROWS", group_rows)
    model = _model(name, attn)
    g = torch.Generator().manual_seed(2)
    # eager: equal lengths, since transformers 5.24's eager LLaMA already gets a left-padded prompt
    # wrong (its prefill, before any decoding); the decode steps still run on the additive 4-D mask
    lengths = (3, 9, 5, 1, 7, 4, 6, 2, 8) if attn == "sdpa" else (5,) * 9
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in lengths]
    eos = _common_token([_no_cache(model, p, 12, -1) for p in prompts])
    ref = [_no_cache(model, p, 12, eos) for p in prompts]
    assert len({len(r) for r in ref}) > 2  # rows stop at different steps (and some never)
    for b, r in zip(_decode(model, prompts, eos_id=eos), ref):
        assert b[: len(r)] == r and all(t == 0 for t in b[len(r):])


def test_finished_rows_stop_costing():
    """Once enough rows hit eos they leave the batch: the forwards after see only the rows still running."""
    model = _model("tiny-llama")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 9, 5, 1, 7, 4, 6, 2, 8)]
    eos = _common_token([_no_cache(model, p, 12, -1) for p in prompts])
    ref = [_no_cache(model, p, 12, eos) for p in prompts]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        _decode(model, prompts, eos_id=eos)
    finally:
        hook.remove()
    running = [sum(len(r) > t + 1 for r in ref) for t in range(max(len(r) for r in ref) - 1)]  # rows needing step t+1
    assert rows[0] == len(prompts)  # the prompt forward
    assert rows[1:] == [max(n, 1) if n < len(prompts) else n for n in running], (rows, running)


@pytest.mark.parametrize("kind", ["copy", "shared", "small"])
def test_step_decoder_generate_equals_generation_without_cache(kind):
    """SIM-CoT's step decoder decodes through the same loop: each row equals re-running
    [latent prefix, tokens so far] without a cache."""
    import contextlib
    from types import SimpleNamespace

    from simcot.models.decoding import body, head
    from simcot.models.step_decoder import StepDecoder

    main = _model("tiny-llama")
    dec = StepDecoder(kind, main, SimpleNamespace(lora_r=4, lora_alpha=8, small_layers=1, small_hidden=0,
                                                  small_model="")).double().eval()
    with torch.no_grad():
        for p in dec.parameters():  # the shared adapter starts as a no-op (B = 0): make it count
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    prefix = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lm = main if kind == "shared" else dec.lm
    on = dec._adapter_on if kind == "shared" else contextlib.nullcontext

    def plain(row, eos, n=8):
        e, out = dec._embed_in(prefix[row:row + 1]), []
        with torch.no_grad(), on():
            for _ in range(n):
                tok = int(head(lm)(body(lm)(inputs_embeds=e).last_hidden_state[:, -1]).argmax())
                out.append(tok)
                if tok == eos:
                    break
                e = torch.cat([e, dec._embed_in(main.get_input_embeddings()(torch.tensor([[tok]])))], 1)
        return out

    eos = _common_token([plain(r, -1) for r in range(6)])
    refs = [plain(r, eos) for r in range(6)]
    assert len({len(r) for r in refs}) > 1
    got = dec.generate(main, prefix, 8, eos, 0).tolist()
    for row, ref in zip(got, refs):
        assert row[: len(ref)] == ref and all(t == 0 for t in row[len(ref):])


def test_prompt_in_length_groups_equals_one_forward():
    """`by_length`: each group is cut to its own longest row; the merged cache and last-column
    outputs equal one forward over the whole padded batch (float64), the padding columns zero."""
    model = _model("tiny-llama")
    g = torch.Generator().manual_seed(3)
    ids, mask = left_pad([torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 9, 5, 1, 7, 4, 6)], 0)
    pos = decoding.positions(mask)
    calls = []

    def forward(i, m, p):
        calls.append(tuple(i.shape))
        out = model(input_ids=i, attention_mask=m, position_ids=p, use_cache=True)
        return out.logits[:, -1], decoding.cache_of(out)

    with torch.no_grad():
        one, one_cache = forward(ids, mask, pos)
        calls.clear()
        grouped, cache = decoding.by_length(forward, ids, mask, pos, 3)
    assert calls == [(3, 9), (2, 5), (2, 3)]  # lengths 9 7 6 | 5 4 | 3 1, each group as wide as its longest
    torch.testing.assert_close(grouped, one, rtol=0, atol=1e-12)
    for a, b in zip(cache.layers, one_cache.layers):
        assert a.keys.shape == b.keys.shape
        for got, ref in ((a.keys, b.keys), (a.values, b.values)):
            torch.testing.assert_close(got * mask[:, None, :, None], ref * mask[:, None, :, None], rtol=0, atol=1e-12)
            for row, n in enumerate((3, 9, 5, 1, 7, 4, 6)):  # columns left of the row's group: never computed
                group_width = {9: 9, 7: 9, 6: 9, 5: 5, 4: 5, 3: 3, 1: 3}[n]
                assert not got[row, :, : 9 - group_width].any()


def test_prompt_groups_follow_the_batch_and_stay_one_under_zero3():
    model = _model("tiny-llama")
    assert [decoding.prefix_groups(model, n) for n in (1, 31, 32, 64, 256, 4096)] == [1, 1, 1, 2, 8, 8]
    model.get_input_embeddings().weight.ds_id = 0  # how ZeRO-3 marks a partitioned parameter
    assert decoding.prefix_groups(model, 256) == 1  # every rank must make the same number of forwards


def test_cpu_steps_run_the_step_attention_and_the_model_keeps_its_own():
    """On the CPU an sdpa model's single-token steps run the step attention (eager math, cheaper
    for one query row: models/step_attention.py); its config names sdpa again afterwards, also
    when a step raises."""
    model = _model("tiny-llama")
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    try:
        _decode(model, [[5, 6, 7], [8]], n=3, eos_id=-1)
    finally:
        hook.remove()
    assert seen == ["sdpa", STEP_ATTENTION, STEP_ATTENTION]  # the prompt, then two steps
    assert model.config._attn_implementation == "sdpa"
    ids, mask = left_pad([[5, 6]], 0)
    state = prefill_ids(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom"):
        decoding.decode(lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")), state, 3, -1, 0, lm=model)
    assert model.config._attn_implementation == "sdpa"


def test_compiled_step_decodes_what_the_eager_step_does(monkeypatch):
    """`--eval.compile` hands decode the torch.compile'd step (made once per model, dynamic shapes:
    the batch shrinks as rows finish and the cache grows). Traced here with the "aot_eager"
    backend, which checks the tracing, fake-tensor shapes included (the step attention's op has a
    fake of its own), and leaves inductor's code generation to the benchmark."""
    model = _model("tiny-llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 9, 5, 1, 7, 4)]
    ids, mask = left_pad(prompts, pad_id=0)
    free = greedy_decode(model, prefill_ids(model, ids, mask), 20, eos_id=-1, pad_id=0)
    eos = int(free[0, 5])  # a token some rows make early: rows finish at different steps
    want = greedy_decode(model, prefill_ids(model, ids, mask), 20, eos_id=eos, pad_id=0)
    made, real = [], decoding.compiled_step
    monkeypatch.setattr(decoding, "compiled_step", lambda lm: made.append(lm) or real(lm, backend="aot_eager"))
    got = greedy_decode(model, prefill_ids(model, ids, mask), 20, eos_id=eos, pad_id=0, compile=True)
    assert made == [model] and torch.equal(got, want) and (got[:, :-1] == eos).any()  # some rows stopped early
    assert real(model, backend="aot_eager") is real(model, backend="aot_eager")  # one compiled step per model


def test_cpu_cache_buffers_are_reused_only_once_nothing_holds_them():
    pool = decoding.CpuCacheBuffers()
    a = pool.zeros((2, 3, 5), torch.float32)
    a.fill_(7.0)
    held = pool.zeros((2, 3, 5), torch.float32)  # `a` is alive: another flat
    assert held.data_ptr() != a.data_ptr() and len(pool.flats) == 2
    ptr = a.data_ptr()
    del a
    again = pool.zeros((3, 11), torch.float32)  # 33 = 30 + 30 // 8 elements: fits the first flat, zeroed
    assert again.data_ptr() == ptr and len(pool.flats) == 2 and not again.any()
    view = again[0]
    del again
    assert pool.zeros((2, 3, 5), torch.float32).data_ptr() not in (ptr, held.data_ptr())  # a view keeps it in use
    assert pool.zeros((4, 10), torch.float64).dtype == torch.float64
    pool.release()
    assert pool.flats == [] and not view.any()


def test_cpu_cache_buffers_keep_free_flats_up_to_what_is_in_use(monkeypatch):
    monkeypatch.setattr(decoding.CpuCacheBuffers, "FREE_BYTES", 100)
    pool = decoding.CpuCacheBuffers()
    in_use = pool.zeros((100,), torch.float32)  # a flat of 112 elements: 448 bytes in use
    for n in (10, 20, 40, 80):  # each dropped at once, each a miss: free flats of 11, 22, 45, 90 elements
        pool.zeros((n,), torch.float32)
    assert [f.numel() for f in pool.flats] == [112, 11, 22, 45, 90]  # 4 x (44 .. 360) = 672 bytes free
    pool.zeros((500,), torch.float32)  # a miss: free flats dropped, oldest first, until <= 448 bytes
    assert [f.numel() for f in pool.flats] == [112, 90, 562] and in_use.data_ptr() == pool.flats[0].data_ptr()
    pool.zeros((1000,), torch.float32)
    assert [f.numel() for f in pool.flats] == [112, 1125]


def test_batches_of_a_decode_reuse_the_cache_buffers_and_decode_the_same():
    """The second batch's reserved cache (prompt groups, then a grown buffer) takes the flats the
    first batch's dropped; the tokens equal a decode with fresh buffers."""
    model = _model("tiny-llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 40, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (64,), generator=g)]
    ids, mask = left_pad(prompts, 0)
    decoding.CPU_CACHE_BUFFERS.release()
    with torch.no_grad():
        first = greedy_decode(model, prefill_ids(model, ids, mask), 40, eos_id=-1, pad_id=0)
        flats = len(decoding.CPU_CACHE_BUFFERS.flats)
        second = greedy_decode(model, prefill_ids(model, ids, mask), 40, eos_id=-1, pad_id=0)
    assert flats > 0 and len(decoding.CPU_CACHE_BUFFERS.flats) == flats
    decoding.CPU_CACHE_BUFFERS.release()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoding, "cache_zeros", lambda like, *shape: like.new_zeros(shape))
        fresh = greedy_decode(model, prefill_ids(model, ids, mask), 40, eos_id=-1, pad_id=0)
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


def _rows_ending_at_different_steps(model, n=20, seed=3, lengths=(3, 9, 5, 1, 7, 4, 6, 2, 8)):
    """Prompts, an eos that some rows make early and others never, and what greedy_decode makes."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 40, (k,), generator=g).tolist() for k in lengths]
    ids, mask = left_pad(prompts, pad_id=0)
    free = greedy_decode(model, prefill_ids(model, ids, mask), n, eos_id=-1, pad_id=0)
    eos = _common_token([row.tolist() for row in free])
    want = greedy_decode(model, prefill_ids(model, ids, mask), n, eos_id=eos, pad_id=0)
    assert len({int((row == eos).nonzero()[0]) if (row == eos).any() else -1 for row in want}) > 2
    return ids, mask, eos, want


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_decode_equals_the_growing_one_on_fixed_buffers(name, attn):
    """A static decode (CUDA graphs' shapes): the same tokens; one cache reservation for the whole
    answer, a multiple of STATIC_BUCKET; finished rows leave only down to powers of two; and the
    next batch of the same shapes runs on the very same buffers (no new CUDA graph record)."""
    model = _model(name, attn)
    # eager: equal lengths (transformers' eager LLaMA gets a left-padded prompt wrong, see above)
    ids, mask, eos, want = _rows_ending_at_different_steps(model, lengths=(3, 9, 5, 1, 7, 4, 6, 2, 8) if attn == "sdpa"
                                                           else (5,) * 9)
    decoding.STATIC_BUFFERS.release()
    rows, shapes = [], set()

    def seen(module, args, kw):
        rows.append(kw["input_ids"].shape[0])
        shapes.update(tuple(layer.keys.shape[2:]) for layer in kw["past_key_values" if "past_key_values" in kw
                                                                   else "cache"].layers)
    state = prefill_ids(model, ids, mask)
    hook = model.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        got = decoding.decode(decoding.lm_step(model), state, 20, eos, 0, lm=model, static=True)
    finally:
        hook.remove()
    assert torch.equal(got, want)
    capacity = -(-(ids.shape[1] + 20) // decoding.STATIC_BUCKET) * decoding.STATIC_BUCKET
    assert shapes == {(capacity, state.cache.layers[0].keys.shape[-1])}  # one reservation, never grown
    running = [int((want[:, :t + 1] != eos).all(1).sum()) for t in range(len(rows))]  # rows running after token t
    sizes = [len(ids)]
    for live in running:  # the step after token t runs the running rows, with finished ones up to a power of two
        sizes.append(decoding.static_rows(sizes[-1], live))
    assert rows == sizes[1:] and len(set(rows)) > 1 and all(r & (r - 1) == 0 for r in rows if r < len(ids)), (rows, running)
    ptrs = {k: b.data_ptr() for k, b in decoding.STATIC_BUFFERS.buffers.items()}
    again = decoding.decode(decoding.lm_step(model), prefill_ids(model, ids, mask), 20, eos, 0, lm=model, static=True)
    assert torch.equal(again, want) and {k: b.data_ptr() for k, b in decoding.STATIC_BUFFERS.buffers.items()} == ptrs
    decoding.STATIC_BUFFERS.release()
    assert decoding.STATIC_BUFFERS.buffers == {}


def test_static_compiled_decode_traces_once_and_runs_on_gpus_only(monkeypatch):
    """`--eval.compile` decodes statically where CUDA graphs exist (STATIC_DEVICES), its step
    compiled for them ("reduce-overhead"). Every step after the first runs the graph traced then,
    and at one batch size every integer the graph takes is the same at every step: CUDA graphs
    record one graph per value of each (a position kept as a Python int, or a growing cache, would
    record one per token). Traced here with the "aot_eager" backend (inductor's CUDA graphs need a
    GPU: benchmarks/gpu_checks.sh)."""
    model = _model("tiny-llama")
    ids, mask, eos, want = _rows_ending_at_different_steps(model)
    traced, modes, steps, ints = [], [], [], []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, inputs):
        traced.append(len(gm.graph.nodes))
        run = aot_eager(gm, inputs)

        def called(*args):
            ints.append(tuple(a for a in args if isinstance(a, int)))  # the symbolic sizes' values
            return run(*args)
        return called

    def compiled(lm, mode=None):
        modes.append(mode)
        if mode is None:  # the growing decode's compiled step: test_compiled_step_decodes_what_the_eager_step_does
            return decoding.lm_step(lm)
        step = torch.compile(decoding.lm_step(lm), dynamic=True, backend=counting)

        def counted(tok, cache, **kw):
            before = len(traced)
            out = step(tok, cache, **kw)
            steps.append((tok.shape[0], len(traced) - before))
            return out
        return counted
    monkeypatch.setattr(decoding, "compiled_step", compiled)
    torch._dynamo.reset()
    monkeypatch.setattr(decoding, "STATIC_DEVICES", ("cpu",))
    got = greedy_decode(model, prefill_ids(model, ids, mask), 20, eos_id=eos, pad_id=0, compile=True)
    assert torch.equal(got, want) and modes == ["reduce-overhead"]
    assert steps[0][1] >= 1 and all(n == 0 for _, n in steps[1:]), steps  # traced at the first step only
    assert len({b for b, _ in steps}) > 1  # though the batch shrank
    by_batch = {}
    for (b, _), values in zip(steps, ints):
        by_batch.setdefault(b, set()).add(values)
    assert all(len(v) == 1 for v in by_batch.values()), by_batch
    monkeypatch.setattr(decoding, "STATIC_DEVICES", ("cuda",))
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        assert torch.equal(greedy_decode(model, prefill_ids(model, ids, mask), 20, eos_id=eos, pad_id=0,
                                         compile=True), want)
    finally:
        hook.remove()
    assert modes == ["reduce-overhead", None]  # on the CPU: the growing decode, finished rows leave at once
    assert rows[1] < len(ids) and any(r & (r - 1) for r in rows[1:])  # sizes that are not powers of two
