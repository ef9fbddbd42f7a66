"""CODI (Shen et al., arXiv 2502.21074): one model as teacher on the explicit CoT and as student on
latents, distilled at the token before the answer.

- Teacher: ``question steps answer``; CE on steps + answer.
- Student: ``question <bot>``, then n latents (the first from the ``<bot>`` state), each passed
  through the projection (Linear-GELU-Linear-LayerNorm) before being fed back, then
  ``<eot> answer``; CE on the answer.
- Distillation: at the token just before the answer number (the same answer tokens on both
  sides), for every entry of ``hidden_states`` (embeddings + all layers; the last is after the
  final norm): ``mean_j f(h_s^j, sg(h_t^j)) / std(h_t^j)``, f = smooth-L1 (or MSE, then / std^2),
  std a scalar over the batch and dims.
- Loss = student_weight * CE_student + teacher_weight * CE_teacher + gamma * distill.

Deliberate differences from the reference: one teacher forward with grad (its detached states
are the targets) instead of a no-grad and a grad forward; attention masks exclude padding in
every pass (the reference lets latents and answer attend to left pads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simcot.models.decoding import body, left_pad
from simcot.models.projection import LatentProjection
from simcot.models.rollout import continue_tokens, run_latents
from simcot.train.config import ConfigError
from simcot.train.data.examples import Example
from simcot.train.methods.base import IGNORE, LossOutput, lm_batch, right_pad, shifted_ce
from simcot.train.methods.latent import LatentMethod


def distillation(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], kind: str,
                 div_std: bool) -> torch.Tensor:
    """Mean over layers of the per-layer distance between selected states, teacher side stop-grad."""
    total = 0.0
    for s, t in zip(student, teacher):
        t = t.detach()
        if kind == "smooth_l1":
            d = F.smooth_l1_loss(s, t)
            if div_std:
                d = d / t.std()
        else:
            d = F.mse_loss(s, t)
            if div_std:
                d = d / t.std() ** 2
        total = total + d
    return total / len(student)


class Codi(LatentMethod):
    name = "codi"
    teacher_pass = True

    @classmethod
    def latent_budget(cls, latents, stages):
        return {"codi.n_latents": latents}

    @classmethod
    def validate(cls, cfg):
        if cfg.codi.n_latents < 0:
            raise ConfigError("config key 'codi.n_latents' must be >= 0")
        if not cfg.data.answer_prefix.strip():
            raise ConfigError("codi distils at the token before the answer: data.answer_prefix must not be empty")

    def setup_model(self, model):
        if self.cfg.codi.projection and model.projection is None:
            model.projection = LatentProjection(model.config.hidden_size, self.cfg.codi.proj_dim)

    def latent_count(self, epoch, ex: Example | None = None):
        return self.cfg.codi.n_latents

    def teacher_steps(self, ex: Example) -> list[list[int]]:
        steps = ex["steps"]
        return steps[:-1] if self.cfg.codi.drop_last_step and steps else steps

    def collate(self, examples: list[Example], epoch, rng):
        sp = self.special
        n = self.cfg.codi.n_latents
        t_seqs, t_labels, t_pos = [], [], []
        for ex in examples:
            cot = [t for s in self.teacher_steps(ex) for t in s]
            t_seqs.append(ex["q"] + cot + ex["a"])
            t_labels.append([IGNORE] * len(ex["q"]) + cot + ex["a"])
            t_pos.append(len(ex["q"]) + len(cot) + ex["a_marker"] - 1)
        teacher = lm_batch(t_seqs, t_labels, sp.pad)
        prefix_ids, prefix_mask = left_pad([ex["q"] + [sp.bot] for ex in examples], sp.pad)
        conts = [[sp.eot] + ex["a"] for ex in examples]
        cont_mask = right_pad([[1] * len(c) for c in conts], 0)
        return {"teacher_ids": teacher["input_ids"], "teacher_mask": teacher["attention_mask"],
                "teacher_labels": teacher["labels"], "teacher_pos": torch.tensor(t_pos),
                "prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
                "n_latents": torch.full((len(examples),), n), "max_latents": n,
                "cont_ids": right_pad(conts, sp.pad), "cont_mask": cont_mask,
                "labels": right_pad([[IGNORE] + ex["a"] for ex in examples], IGNORE),
                "student_pos": torch.tensor([ex["a_marker"] for ex in examples]),  # [eot] shifts a by one
                "n_tokens": teacher["n_tokens"] + int(prefix_mask.sum()) + n * len(examples) + int(cont_mask.sum())}

    def forward_parts(self, model, batch):
        """Teacher and student passes; returns (parts dict of losses, rollout)."""
        c = self.cfg.codi
        rows = torch.arange(batch["teacher_ids"].shape[0], device=batch["teacher_ids"].device)
        t_out = body(model.lm)(input_ids=batch["teacher_ids"], attention_mask=batch["teacher_mask"],
                               output_hidden_states=True)
        teacher_ce = shifted_ce(model.lm, t_out.last_hidden_state, batch["teacher_labels"])
        ro = run_latents(model, batch["prefix_ids"], batch["prefix_mask"], batch["n_latents"], batch["max_latents"])
        s_out = continue_tokens(model, ro, batch["cont_ids"], batch["cont_mask"], output_hidden_states=True)
        student_ce = shifted_ce(model.lm, s_out.last_hidden_state, batch["labels"])
        distill = distillation(tuple(h[rows, batch["student_pos"]] for h in s_out.hidden_states),
                               tuple(h[rows, batch["teacher_pos"]] for h in t_out.hidden_states),
                               c.distill_loss, c.distill_div_std)
        loss = c.student_weight * student_ce + c.teacher_weight * teacher_ce + c.distill_weight * distill
        return {"loss": loss, "ce": student_ce, "teacher_ce": teacher_ce, "distill": distill}, ro

    def loss(self, model, batch):
        parts, _ = self.forward_parts(model, batch)
        loss = parts.pop("loss")
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()})
