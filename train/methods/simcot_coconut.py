"""SIM-CoT on Coconut (Wei et al., arXiv 2509.20317): Coconut plus the step decoder.

Each group of c latents is decoded into the step it replaced at the current stage; with more
replaced steps than groups the last group gets the rest merged, and groups without a step get
the answer ('### N') as a pseudo-step. Loss = Coconut's CE + weight * step-decoder CE, one scalar.
As in the Coconut fork, the decoder reads its latents at positions 1..c and trains without dropout.
"""

from __future__ import annotations

from simcot.train.data.examples import Example
from simcot.train.methods.base import LossOutput, shifted_ce
from simcot.train.methods.coconut import Coconut
from simcot.train.methods.step_supervision import (StepSupervised, align_steps, build_decoder, decoder_batch,
                                                   decoder_loss, step_match, validate_decoder)


class SimCoTCoconut(StepSupervised, Coconut):
    name = "simcot-coconut"
    base_method = "coconut"
    decoder_pass = True

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        validate_decoder(cfg)

    @property
    def group(self) -> int:
        """Latents per decoded slot."""
        return self.cfg.coconut.c_thought

    def latent_table(self, model, ro):
        return ro.latents

    def decode_slots(self, i, prompt):
        """Every latent group of a prompt, with its gold step when there is one (for `simcot decode`)."""
        n_groups = prompt.n_latents // self.cfg.coconut.c_thought
        gold = align_steps(prompt.ex["steps"], n_groups, prompt.ex["a"][:-1]) if prompt.ex["steps"] else []
        return [(i, g, gold[g] if g < len(gold) and gold[g] else []) for g in range(n_groups)]

    def setup_model(self, model):
        if model.step_decoder is None and self.builds("step_decoder"):
            model.step_decoder = build_decoder(model, self.cfg, self.tok, self.restoring, first_position=1,
                                               dropout=False)

    @property
    def normalization(self) -> str:
        n = self.cfg.simcot.normalization
        return "sequence" if n == "auto" else n

    def slot_rows(self, i: int, ex: Example, n_skip: int, n_latents: int) -> list[tuple[int, int, list[int]]]:
        slots = align_steps(ex["steps"][:n_skip], n_latents // self.cfg.coconut.c_thought, ex["a"][:-1])
        return [(i, g, self.step_targets(t)) for g, t in enumerate(slots) if t is not None]

    def collate(self, examples: list[Example], epoch, rng):
        plans = [self.plan(ex, epoch, rng) for ex in examples]
        batch = self.collate_plans(examples, plans)
        rows = [r for i, (ex, (skip, n)) in enumerate(zip(examples, plans)) for r in self.slot_rows(i, ex, skip, n)]
        batch.update(decoder_batch(rows, self.cfg.coconut.c_thought, self.special.eos, self.special.pad,
                                   self.cfg.simcot.max_step_tokens))
        return batch

    def loss(self, model, batch):
        ro, out = self.rollout(model, batch)
        ce = shifted_ce(model.lm, out.last_hidden_state, batch["labels"])
        dec = decoder_loss(model, ro.latents, batch, self.normalization)
        return LossOutput(ce + self.cfg.simcot.weight * dec, {"ce": ce.detach(), "decoder_ce": dec.detach()})

    def eval_metrics(self, model, prompts, ro):
        if model.step_decoder is None:
            return {}
        rows = [r for i, p in enumerate(prompts)
                for r in self.slot_rows(i, p.ex, len(p.ex["steps"]), p.n_latents)]
        return step_match(model, ro.latents, rows, self.cfg.coconut.c_thought, self.tok, self.special.eos,
                          self.special.pad, self.cfg.simcot.max_step_tokens)
