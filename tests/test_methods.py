"""Continuous-thought methods: exact token layouts, alignment rules, losses and gradients."""

import random

import pytest
import torch

from simcot.models.latent_health import latent_health
from simcot.train.assemble import load_config  # with the method registry's checks
from simcot.train.methods import METHODS
from simcot.train.methods.base import IGNORE
from simcot.train.methods.codi import distillation
from simcot.train.methods.step_supervision import align_steps, decoder_batch
from simcot.train.data.tokenizer import SpecialIds

SP = SpecialIds(bot=2, eot=3, latent=4, pad=0, eos=1)


def ex(q, steps, a, idx=0):
    """A tokenized example: `a` is the answer ids without eos; its first token is the marker."""
    return {"q": q, "steps": steps, "a": a + [SP.eos], "a_marker": 1, "answer": "x", "idx": idx}


def method(name, **ov):
    return METHODS[name](load_config(None, {"method": name, **ov}), None, SP)


def unpadded(batch, i, key, mask_key, left=False):
    ids, mask = batch[key][i], batch[mask_key][i].bool()
    return ids[mask].tolist()


def sequence(batch, i):
    """Row i as the model sees it: prefix, latent slots, continuation (padding removed)."""
    return (unpadded(batch, i, "prefix_ids", "prefix_mask") + ["L"] * int(batch["n_latents"][i])
            + unpadded(batch, i, "cont_ids", "cont_mask"))


# ---------------------------------------------------------------------------------- Coconut

E1 = ex([10, 11], [[20, 21], [22], [23, 24]], [30, 31])
E2 = ex([12], [[25]], [32])


@pytest.mark.parametrize("epoch, want1, want2", [
    (0, [10, 11, 2, 3, 20, 21, 22, 23, 24, 30, 31, 1], [12, 2, 3, 25, 32, 1]),
    (1, [10, 11, 2, "L", "L", 3, 22, 23, 24, 30, 31, 1], [12, 2, "L", "L", 3, 32, 1]),
    (2, [10, 11, 2] + ["L"] * 4 + [3, 23, 24, 30, 31, 1], [12, 2] + ["L"] * 4 + [3, 32, 1]),  # fewer steps: still k*c
    (3, [10, 11, 2] + ["L"] * 4 + [3, 30, 31, 1], [12, 2, "L", "L", 3, 32, 1]),  # past the last stage
])
def test_coconut_stage_layout(epoch, want1, want2):
    m = method("coconut", **{"coconut.c_thought": 2, "coconut.max_latent_stage": 2})
    b = m.collate([E1, E2], epoch, random.Random(0))
    assert sequence(b, 0) == want1 and sequence(b, 1) == want2
    # labels: nothing before the first token after <eot>
    lab = b["labels"][0][b["cont_mask"][0].bool()].tolist()
    assert lab[0] == IGNORE and lab[1:] == unpadded(b, 0, "cont_ids", "cont_mask")[1:]
    assert b["max_latents"] == int(b["n_latents"].max())


def test_coconut_pad_latent_to_max_and_eval_prompt():
    m = method("coconut", **{"coconut.c_thought": 2, "coconut.max_latent_stage": 2, "coconut.pad_latent_to_max": True})
    b = m.collate([E1, E2], 5, random.Random(0))
    assert b["n_latents"].tolist() == [4, 4]
    assert m.eval_prompt(E1, 1).n_latents == 2 and m.eval_prompt(E1, 9).n_latents == 4
    assert m.eval_prompt(E1, 1).ids == [10, 11, 2]


def reference_eval_latents(n_steps, epoch, c_thought, max_latent_stage, epochs_per_stage, pad_latent_to_max):
    """facebookresearch/coconut dataset.py:198-209 (get_question_latent_dataset), run.py:244-246."""
    scheduled_stage = epoch // epochs_per_stage
    if pad_latent_to_max:
        max_latent_stage = max_latent_stage
    else:
        max_latent_stage = min(max_latent_stage, n_steps)
    k = min(max_latent_stage, scheduled_stage)
    return k * c_thought


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("c, max_stage, per_stage", [(1, 3, 1), (2, 2, 1), (2, 3, 2), (1, 0, 1)])
def test_coconut_eval_latents_per_sample_follow_the_reference(pad, c, max_stage, per_stage):
    m = method("coconut", **{"coconut.c_thought": c, "coconut.max_latent_stage": max_stage,
                             "coconut.epochs_per_stage": per_stage, "coconut.pad_latent_to_max": pad})
    samples = [ex([10], [[20]] * n, [30]) for n in range(6)]
    for epoch in range(12):
        got = [m.eval_prompt(e, epoch).n_latents for e in samples]
        assert got == [reference_eval_latents(n, epoch, c, max_stage, per_stage, pad) for n in range(6)], epoch
        if m.stage(epoch) > max_stage:  # after the last stage: the same count as the training layout
            assert got == m.collate(samples, epoch, random.Random(0))["n_latents"].tolist()
    assert m.eval_latents(11) == max_stage * c  # the budget (tags, a typed question)


def test_eval_prompt_forced_latent_count_wins_over_the_method_and_eval_n_latents():
    m = method("coconut", **{"coconut.c_thought": 2, "coconut.max_latent_stage": 2})
    assert [m.eval_prompt(e, 9).n_latents for e in (E1, E2)] == [4, 2]  # per sample: E2 has one step
    assert [m.eval_prompt(e, 9, n_latents=3).n_latents for e in (E1, E2)] == [3, 3]
    forced = method("coconut", **{"coconut.c_thought": 2, "coconut.max_latent_stage": 2, "eval.n_latents": 5})
    assert [forced.eval_prompt(e, 9).n_latents for e in (E1, E2)] == [5, 5]
    assert method("codi", **{"codi.n_latents": 3}).eval_prompt(E2, 0, n_latents=1).n_latents == 1


@pytest.mark.parametrize("name", list(METHODS))
def test_latents_in_reads_back_the_budget_latent_budget_sets(name):
    """What `simcot plan` sizes the rollout by: the budget a config gives, for every method; for
    Coconut c x max stage, which is L when L <= S or S divides L, and is the most a sample gets."""
    from simcot.train.config import load_config as load_unchecked  # the budget needs no method checks

    m = METHODS[name]
    for latents in (1, 2, 3, 6):
        cfg = load_unchecked(None, {"method": name, **m.latent_budget(latents, 3)})
        assert m.latents_in(cfg) == (latents if m.latent_budget(1, 1) else 0)  # nocot, cot: none
    if "coconut.c_thought" in m.latent_budget(1, 1):
        cfg = load_config(None, {"method": name, "coconut.pad_latent_to_max": True, **m.latent_budget(4, 3)})
        assert m.latents_in(cfg) == 6 == METHODS[name](cfg, None, SP).eval_latents(epoch=10)


def test_coconut_uniform_prob_draws_a_stage_per_sample():
    m = method("coconut", **{"coconut.uniform_prob": 1.0, "coconut.max_latent_stage": 3})
    stages = {m.plan(E1, 0, random.Random(s))[0] for s in range(40)}
    assert stages == {0, 1, 2, 3}


def test_coconut_optimizer_reset_defaults_to_every_epoch_as_the_reference():
    m = method("coconut", **{"coconut.epochs_per_stage": 2, "coconut.max_latent_stage": 2})
    assert m.cfg.coconut.reset_optimizer == "epoch"  # reference run.py:312-319: a fresh AdamW every epoch
    assert all(m.reset_optimizer_at(e) for e in range(1, 10))


def test_coconut_optimizer_reset_at_stage_changes():
    m = method("coconut", **{"coconut.epochs_per_stage": 2, "coconut.max_latent_stage": 2,
                             "coconut.reset_optimizer": "stage"})
    assert [m.stage(e) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]  # capped: all steps replaced
    assert [m.reset_optimizer_at(e) for e in range(1, 10)] == [False, True, False, True, False, True, False,
                                                                False, False]
    assert method("coconut", **{"coconut.stage_offset": 1}).stage(0) == 1
    assert method("coconut", **{"coconut.reset_optimizer": "epoch"}).reset_optimizer_at(1)
    assert not method("coconut", **{"coconut.reset_optimizer": "none"}).reset_optimizer_at(2)


# ------------------------------------------------------------------------------------- CODI


def test_codi_distills_at_the_token_before_the_answer_on_both_sides():
    m = method("codi", **{"codi.n_latents": 3})
    e = dict(ex([10, 11], [[20, 21], [22]], [40, 41, 30, 31]), a_marker=2)  # '###', ' ' then answer 30 31
    b = m.collate([e, E2], 0, random.Random(0))
    t_pos, s_pos = b["teacher_pos"][0], b["student_pos"][0]
    assert b["teacher_ids"][0][t_pos] == 41 and b["teacher_ids"][0][t_pos + 1] == 30
    assert b["cont_ids"][0][s_pos] == 41 and b["cont_ids"][0][s_pos + 1] == 30
    assert sequence(b, 0) == [10, 11, 2, "L", "L", "L", 3, 40, 41, 30, 31, 1]
    assert unpadded(b, 0, "teacher_ids", "teacher_mask") == [10, 11, 20, 21, 22, 40, 41, 30, 31, 1]


def test_codi_drop_last_step_option():
    m = method("codi", **{"codi.drop_last_step": True})
    b = m.collate([E1], 0, random.Random(0))
    assert unpadded(b, 0, "teacher_ids", "teacher_mask") == [10, 11, 20, 21, 22, 30, 31, 1]


def test_distillation_is_std_normalised_and_stops_teacher_gradients():
    t = (torch.tensor([[0.0, 2.0], [4.0, 6.0]], requires_grad=True),)
    s = (torch.tensor([[0.5, 2.0], [4.0, 9.0]], requires_grad=True),)
    d = distillation(s, t, "smooth_l1", True)
    expected = ((0.5 ** 2 / 2) + (3 - 0.5)) / 4 / torch.tensor([0.0, 2, 4, 6]).std()
    assert torch.allclose(d, expected)
    d.backward()
    assert t[0].grad is None and s[0].grad is not None
    assert distillation(t, t, "mse", True).item() == 0.0


# ---------------------------------------------------------------------------------- SIM-CoT


def test_align_steps_rules():
    s = [[1], [2], [3], [4]]
    assert align_steps(s, 2, None) == [[1], [2, 3, 4]]  # more steps than slots: merge into the last
    assert align_steps(s, 4, None) == s  # equal
    assert align_steps(s[:2], 4, None) == [[1], [2], None, None]  # fewer: no loss (CODI)
    assert align_steps(s[:1], 3, [9, 9]) == [[1], [9, 9], [9, 9]]  # fewer: answer pseudo-step (Coconut)
    assert align_steps(s, 0, None) == []


def test_simcot_coconut_rows_follow_the_replaced_steps():
    m = method("simcot-coconut", **{"coconut.c_thought": 2, "coconut.max_latent_stage": 2})
    b = m.collate([E1, E2], 1, random.Random(0))  # stage 1: one group each, the first step
    assert b["dec_sample"].tolist() == [0, 1] and b["dec_slot"].tolist() == [0, 0]
    assert b["dec_index"].tolist() == [[0, 1], [0, 1]]
    assert b["dec_ids"][0].tolist() == [20, 21, 1] and b["dec_ids"][1][:2].tolist() == [25, 1]
    b = m.collate([E1, E2], 4, random.Random(0))  # past the last stage: E1 merges, E2 gets the answer
    rows = list(zip(b["dec_sample"].tolist(), b["dec_slot"].tolist(),
                    [r[m_.bool()].tolist() for r, m_ in zip(b["dec_ids"], b["dec_mask"])]))
    assert rows == [(0, 0, [20, 21, 1]), (0, 1, [22, 23, 24, 1]), (1, 0, [25, 1])]


def test_simcot_codi_slots_count_the_bot_latent():
    m = method("simcot-codi", **{"codi.n_latents": 1})
    b = m.collate([E1], 0, random.Random(0))  # 2 slots for 3 steps: the last two merge
    assert b["dec_slot"].tolist() == [0, 1] and b["dec_index"].tolist() == [[0], [1]]
    assert [r[m_.bool()].tolist() for r, m_ in zip(b["dec_ids"], b["dec_mask"])] == [[20, 21, 1], [22, 23, 24, 1]]


def test_decoder_batch_without_rows_has_a_dummy_row_without_targets():
    b = decoder_batch([], 2, eos=1, pad=0, max_tokens=8)
    assert b["dec_dummy"].tolist() == [True] and (b["dec_labels"] == IGNORE).all()


def test_decoder_targets_are_the_step_without_its_separator_then_eos(tmp_path):
    """Both references decode the `<<…>>` span + eos (merged steps keep the `\n` between them)."""
    from simcot.train.data.tokenizer import encode_record, record_texts, train_sentencepiece

    rec = {"question": "2*3+1-2", "steps": ["<<2*3=6>>", "<<6+1=7>>", "<<7-2=5>>"], "answer": "5"}
    tok = train_sentencepiece(record_texts([rec] * 4, "### "), 300, tmp_path / "tok")
    sp = SpecialIds.of(tok)
    e = encode_record(tok, rec, "### ")
    for name, ov, epoch in [("simcot-coconut", {"coconut.max_latent_stage": 2}, 5), ("simcot-codi", {"codi.n_latents": 1}, 0)]:
        m = METHODS[name](load_config(None, {"method": name, **ov}), tok, sp)
        b = m.collate([e], epoch, random.Random(0))
        rows = [r[k.bool()].tolist() for r, k in zip(b["dec_ids"], b["dec_mask"])]
        assert all(r[-1] == sp.eos for r in rows), name
        assert [tok.decode(r[:-1]) for r in rows] == ["<<2*3=6>>", "<<6+1=7>>\n<<7-2=5>>"], name


def test_step_targets_split_a_token_that_merges_text_and_separator():
    from simcot.train.methods.step_supervision import StepTargets

    class Tok:  # LLaMA-3 style: '>>\n' is one token (99), '>>' is 98, '\n' is 7
        def decode(self, ids):
            return {99: ">>\n", 98: ">>", 7: "\n", 5: "<<"}[ids[0]]

        def encode(self, text, add_special_tokens=False):
            return {">>": [98], "": []}[text]

    t = StepTargets(Tok())
    assert t([5, 99]) == [5, 98] and t([5, 98, 7]) == [5, 98] and t([5, 98]) == [5, 98] and t([]) == []


def test_codi_decoder_rows_keep_every_step_whole():
    """The SIM-CoT CODI fork cuts every row's step to row 0's length + 1 (dedup_trailing_pads in its
    per-row loop, CODI/src/model.py:494,616); simcot decodes each step whole."""
    m = method("simcot-codi", **{"codi.n_latents": 1})
    short, long_ = ex([10], [[20], [21]], [30]), ex([11], [[22, 23, 24, 25, 26], [27]], [31])
    b = m.collate([short, long_], 0, random.Random(0))
    rows = [r[k.bool()].tolist() for r, k in zip(b["dec_ids"], b["dec_mask"])]
    assert rows == [[20, 1], [21, 1], [22, 23, 24, 25, 26, 1], [27, 1]]


def test_steps_are_not_truncated_by_default():
    assert load_config(None, {}).simcot.max_step_tokens == 0
    m = method("simcot-codi", **{"codi.n_latents": 1})
    b = m.collate([ex([10], [list(range(5, 105))], [30])], 0, random.Random(0))
    assert b["dec_mask"][0].sum() == 101  # 100 step tokens + eos
    assert decoder_batch([(0, 0, list(range(5, 105)))], 1, eos=1, pad=0, max_tokens=8)["dec_mask"].sum() == 9


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from simcot.models.latent_lm import LatentLM

    torch.manual_seed(0)  # GPT-2's default dropout (0.1) everywhere
    return LatentLM(GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=64)))


@pytest.mark.parametrize("name, first, dropout", [("simcot-coconut", 1, False), ("simcot-codi", 0, True)])
def test_step_decoder_positions_and_dropout_follow_the_reference_fork(name, first, dropout):
    """Coconut fork: positions 1..L (coconut.py:744), eval mode (its train() reaches only the base LM,
    coconut.py:789-793); CODI fork: HF's positions 0..L-1 and dropout like any submodule."""
    from simcot.models.decoding import body

    model = _tiny_gpt2()
    method(name).setup_model(model)
    dec = model.step_decoder
    model.train()
    assert model.lm.training and dec.lm.training == dropout
    seen = []
    body(dec.lm).register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["position_ids"][0].tolist()),
                                           with_kwargs=True)
    prefix = torch.randn(2, 2, 16)
    ids, mask = torch.tensor([[5, 6, 1], [7, 1, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    h1, h2 = (dec.hidden(model.lm, prefix, ids, mask) for _ in range(2))
    assert seen[0] == list(range(first, first + 5))
    assert torch.equal(h1, h2) != dropout  # dropout on: two passes differ
    seen.clear()
    dec.generate(model.lm, prefix, 3, eos_id=-1, pad_id=0)
    assert seen == [[first, first + 1], [first + 2], [first + 3]]


# ------------------------------------------------------------------------------ latent health


def test_latent_health_on_collapsed_and_orthogonal_latents():
    same = torch.ones(2, 3, 4)
    eye = torch.eye(4)[:3].expand(2, 3, 4)
    valid = torch.ones(2, 3, dtype=torch.bool)
    h = latent_health(same, valid)
    assert h["latent_cos_within"] == pytest.approx(1) and h["latent_effective_rank"] == pytest.approx(1)
    assert h["latent_cos_across"] == pytest.approx(1)
    h = latent_health(eye, valid)
    assert h["latent_cos_within"] == pytest.approx(0) and h["latent_effective_rank"] == pytest.approx(3)
    assert h["latent_cos_across"] == pytest.approx(1)  # the same slot is identical across samples
    valid[1, 2] = False  # masked slots do not count
    assert latent_health(eye, valid)["latent_effective_rank"] == pytest.approx(2.5)


# ---------------------------------------------------------------------------------- CoT / direct mix


def test_cot_direct_mix_drops_the_steps_of_a_seeded_share_of_examples():
    exs = [ex([10 + i], [[20, 21], [22]], [30, 31], idx=i) for i in range(200)]
    full = [10, 20, 21, 22, 30, 31, SP.eos]

    def rows(ratio, seed=0):
        b = method("cot", **{"cot.direct_ratio": ratio}).collate(exs, 0, random.Random(seed))
        return [unpadded(b, i, "input_ids", "attention_mask") for i in range(len(exs))], b

    plain, b = rows(0.0)
    assert plain[0] == full and all(len(r) == 7 for r in plain)
    direct, b = rows(1.0)
    assert direct[0] == [10, 30, 31, SP.eos]
    assert b["labels"][0][:4].tolist() == [IGNORE, 30, 31, SP.eos]  # the answer alone is supervised
    mixed, _ = rows(0.3)
    n_direct = sum(len(r) == 4 for r in mixed)
    assert 40 <= n_direct <= 80 and rows(0.3)[0] == mixed and rows(0.3, seed=1)[0] != mixed
    with pytest.raises(Exception, match=r"cot.direct_ratio': 1.5 is not in \[0, 1\]"):
        method("cot", **{"cot.direct_ratio": 1.5})


@pytest.mark.parametrize("compile", [False, True])
def test_latent_prefill_follows_eval_compile(compile, monkeypatch):
    """`eval.compile` reaches the latent steps and `<eot>` (`prefill_latents(compile=...)`), not only
    the answer tokens' step."""
    from simcot.train.methods import latent

    seen = []

    class Seen(Exception):
        pass

    def prefill_latents(model, ids, mask, n, max_n, eot, compile=False):
        seen.append(compile)
        raise Seen  # what comes after needs a model
    monkeypatch.setattr(latent, "prefill_latents", prefill_latents)
    m = method("coconut", **{"eval.compile": compile})
    with pytest.raises(Seen):
        m.prefill(None, [m.eval_prompt(E1, 9)], torch.device("cpu"))
    assert seen == [compile]


def test_cot_direct_eval_prompts_with_the_answer_prefix():
    e = ex([10, 11], [[20]], [30, 31])
    assert method("cot").eval_prompt(e).ids == [10, 11]
    assert method("cot", **{"cot.direct_eval": True}).eval_prompt(e).ids == [10, 11, 30]  # a_marker = 1
