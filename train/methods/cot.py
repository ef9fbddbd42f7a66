"""CoT-SFT: question -> reasoning steps -> answer, every target token supervised."""

from __future__ import annotations

from simcot.models.decoding import body
from simcot.train.methods.base import IGNORE, LossOutput, Method, Prompt, lm_batch, shifted_ce


class CoT(Method):
    name = "cot"

    def target(self, ex: dict) -> list[int]:
        return [t for s in ex["steps"] for t in s] + ex["a"]

    def collate(self, examples, epoch, rng):
        seqs = [ex["q"] + self.target(ex) for ex in examples]
        labels = [[IGNORE] * len(ex["q"]) + self.target(ex) for ex in examples]
        return lm_batch(seqs, labels, self.special.pad)

    def loss(self, model, batch):
        hidden = body(model.lm)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ce = shifted_ce(model.lm, hidden, batch["labels"])
        return LossOutput(ce, {"ce": ce.detach()})

    def eval_prompt(self, ex, epoch=None, n_latents=None):
        return Prompt(ex["q"])
