"""SIM-CoT on CODI: CODI plus the step decoder over n+1 latent slots.

The slots are the n projected latents that were fed plus the projection of the state after the
last one (decoded, never fed), as in the reference. Steps are the teacher's CoT steps; more
steps than slots merge into the last slot; slots without a step carry no loss.
Loss = CODI's loss + weight * step-decoder CE, one scalar.
"""

from __future__ import annotations

import torch

from simcot.train.data.examples import Example
from simcot.train.methods.base import LossOutput
from simcot.train.methods.codi import Codi
from simcot.train.methods.step_supervision import (StepSupervised, align_steps, build_decoder, decoder_batch,
                                                   decoder_loss, step_match, validate_decoder)


class SimCoTCodi(StepSupervised, Codi):
    name = "simcot-codi"
    base_method = "codi"
    decoder_pass = True

    group = 1  # latents per decoded slot

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        validate_decoder(cfg)

    def latent_table(self, model, ro):
        return self.table(model, ro)

    def decode_slots(self, i, prompt):
        """Every slot (n fed latents + the final one), with its gold step when there is one."""
        gold = align_steps(self.teacher_steps(prompt.ex), prompt.n_latents + 1, None) if prompt.ex["steps"] else []
        return [(i, g, gold[g] if g < len(gold) and gold[g] else []) for g in range(prompt.n_latents + 1)]

    def setup_model(self, model):
        super().setup_model(model)
        if model.step_decoder is None and self.builds("step_decoder"):
            model.step_decoder = build_decoder(model, self.cfg, self.tok, self.restoring)

    @property
    def normalization(self) -> str:
        n = self.cfg.simcot.normalization
        return "token" if n == "auto" else n

    def slot_rows(self, i: int, ex: Example, n_latents: int) -> list[tuple[int, int, list[int]]]:
        slots = align_steps(self.teacher_steps(ex), n_latents + 1, None)
        return [(i, g, self.step_targets(t)) for g, t in enumerate(slots) if t is not None]

    def collate(self, examples: list[Example], epoch, rng):
        batch = super().collate(examples, epoch, rng)
        n = self.cfg.codi.n_latents
        rows = [r for i, ex in enumerate(examples) for r in self.slot_rows(i, ex, n)]
        batch.update(decoder_batch(rows, 1, self.special.eos, self.special.pad, self.cfg.simcot.max_step_tokens))
        return batch

    @staticmethod
    def table(model, ro) -> torch.Tensor:
        """(B, n+1, H): the fed latents, then the projection of the state after the last one."""
        extra = model.projection(ro.h_final) if model.projection is not None else ro.h_final
        return torch.cat([ro.latents, extra[:, None].to(ro.latents.dtype)], 1)

    def loss(self, model, batch):
        parts, ro = self.forward_parts(model, batch)
        dec = decoder_loss(model, self.table(model, ro), batch, self.normalization)
        loss = parts.pop("loss") + self.cfg.simcot.weight * dec
        return LossOutput(loss, {**{k: v.detach() for k, v in parts.items()}, "decoder_ce": dec.detach()})

    def eval_metrics(self, model, prompts, ro):
        if model.step_decoder is None:
            return {}
        rows = [r for i, p in enumerate(prompts) for r in self.slot_rows(i, p.ex, p.n_latents)]
        return step_match(model, self.table(model, ro), rows, 1, self.tok, self.special.eos, self.special.pad,
                          self.cfg.simcot.max_step_tokens)
