"""Continuous-thought methods: exact token layouts, alignment rules, losses and gradients."""

import random

import pytest
import torch

from simcot.models.latent_health import latent_health
from simcot.train.config import load_config
from simcot.train.methods import METHODS
from simcot.train.methods.base import IGNORE
from simcot.train.methods.codi import distillation
from simcot.train.methods.step_supervision import align_steps, decoder_batch
from simcot.train.tokenizer import SpecialIds

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


def test_coconut_uniform_prob_draws_a_stage_per_sample():
    m = method("coconut", **{"coconut.uniform_prob": 1.0, "coconut.max_latent_stage": 3})
    stages = {m.plan(E1, 0, random.Random(s))[0] for s in range(40)}
    assert stages == {0, 1, 2, 3}


def test_coconut_optimizer_reset_at_stage_changes():
    m = method("coconut", **{"coconut.epochs_per_stage": 2, "coconut.max_latent_stage": 2})
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


def test_cot_direct_eval_prompts_with_the_answer_prefix():
    e = ex([10, 11], [[20]], [30, 31])
    assert method("cot").eval_prompt(e).ids == [10, 11]
    assert method("cot", **{"cot.direct_eval": True}).eval_prompt(e).ids == [10, 11, 30]  # a_marker = 1
