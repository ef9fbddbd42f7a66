"""What every continuous-thought method shares: the latent prefill for evaluation."""

from __future__ import annotations

import torch

from simcot.models.decoding import Prefill, left_pad
from simcot.models.latent_health import latent_health
from simcot.models.rollout import prefill_latents
from simcot.train.data.examples import Example
from simcot.train.methods.base import Method, Prompt


class LatentMethod(Method):
    uses_latents = True

    def latent_count(self, epoch: int | None, ex: Example | None = None) -> int:
        """Latents at evaluation for a model trained up to `epoch`: for sample `ex`, or (None) the budget."""
        raise NotImplementedError

    def eval_latents(self, epoch: int | None, ex: Example | None = None) -> int:
        """``eval.n_latents`` when set (>= 0: force this count), else the method's own count."""
        return self.cfg.eval.n_latents if self.cfg.eval.n_latents >= 0 else self.latent_count(epoch, ex)

    def eval_prompt(self, ex: Example, epoch=None, n_latents=None):
        return Prompt(ex["q"] + [self.special.bot], self.eval_latents(epoch, ex) if n_latents is None else n_latents,
                      ex)

    def prefill(self, model, prompts: list[Prompt], device: torch.device) -> Prefill:
        ids, mask = left_pad([p.ids for p in prompts], self.special.pad)
        n = torch.tensor([p.n_latents for p in prompts], device=device)
        state, ro = prefill_latents(model, ids.to(device), mask.to(device), n, max(p.n_latents for p in prompts),
                                    self.special.eot, compile=self.cfg.eval.compile)
        state.metrics = latent_health(ro.latents, ro.thinking)
        state.metrics.update(self.eval_metrics(model, prompts, ro))
        return state

    def eval_metrics(self, model, prompts: list[Prompt], ro) -> dict[str, float]:
        """Extra per-batch evaluation metrics (SIM-CoT: step-decoding exact match)."""
        return {}
