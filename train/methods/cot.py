"""CoT-SFT: question -> reasoning steps -> answer, every target token supervised.

``cot.direct_ratio`` mixes in direct examples (question -> answer, no steps), drawn per example
from the batch's seeded rng, so one model can answer both ways (SemCoT's answerer must answer
from implicit tokens without writing steps, as the reference's instruct models can);
``cot.direct_eval`` evaluates those direct answers (the prompt ends with the answer prefix).
"""

from __future__ import annotations

from simcot.models.decoding import body
from simcot.train.config import ConfigError
from simcot.train.data.examples import Example
from simcot.train.methods.base import IGNORE, LossOutput, Method, Prompt, lm_batch, shifted_ce


class CoT(Method):
    name = "cot"

    @classmethod
    def validate(cls, cfg) -> None:
        if not 0.0 <= cfg.cot.direct_ratio <= 1.0:
            raise ConfigError(f"config key 'cot.direct_ratio': {cfg.cot.direct_ratio} is not in [0, 1]")

    def target(self, ex: Example) -> list[int]:
        return [t for s in ex["steps"] for t in s] + ex["a"]

    def collate(self, examples: list[Example], epoch, rng):
        ratio = self.cfg.cot.direct_ratio
        # one draw per example whatever the ratio, so a ratio change does not shift other draws
        direct = [rng.random() < ratio for _ in examples]
        targets = [ex["a"] if d else self.target(ex) for ex, d in zip(examples, direct)]
        seqs = [ex["q"] + t for ex, t in zip(examples, targets)]
        labels = [[IGNORE] * len(ex["q"]) + t for ex, t in zip(examples, targets)]
        return lm_batch(seqs, labels, self.special.pad)

    def loss(self, model, batch):
        hidden = body(model.lm)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ce = shifted_ce(model.lm, hidden, batch["labels"])
        return LossOutput(ce, {"ce": ce.detach()})

    def eval_prompt(self, ex: Example, epoch=None, n_latents=None):
        if self.cfg.cot.direct_eval:  # the answer prefix is in the prompt: no room for steps
            return Prompt(ex["q"] + ex["a"][:ex["a_marker"]], ex=ex)
        return Prompt(ex["q"])
