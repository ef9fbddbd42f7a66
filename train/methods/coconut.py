"""Coconut (Hao et al., arXiv 2412.06769): reasoning steps replaced by continuous thoughts.

Training sequence at stage k: ``question <bot> [latent] x k*c <eot> steps[k:] answer``; labels
only after ``<eot>`` (question, markers and latents are never predicted). The latent is the
last-layer hidden state at the previous position, fed back raw (no projection).

Curriculum: stage = epoch // epochs_per_stage; stage k <= max_latent_stage replaces the first k
steps by k*c latents (a sample with fewer than k steps still gets k*c latents, as in the
reference); after the last stage every step is replaced and the latent count stays at
max_latent_stage*c (``pad_latent_to_max``) or min(#steps, max_latent_stage)*c. With
``uniform_prob`` a sample trains at a random stage in [0, #steps].
"""

from __future__ import annotations

import math
import random

import torch

from simcot.models.decoding import left_pad
from simcot.models.rollout import continue_tokens, run_latents
from simcot.train.config import ConfigError
from simcot.train.data.examples import Example
from simcot.train.methods.base import IGNORE, LossOutput, right_pad, shifted_ce
from simcot.train.methods.latent import LatentMethod


class Coconut(LatentMethod):
    name = "coconut"
    starts_from = "cot"  # the curriculum replaces the steps of a CoT-SFT run

    @classmethod
    def latent_budget(cls, latents, stages):
        """c = ceil(L / stages) latents per step over min(L, stages) one-epoch stages, every sample
        padded to the full budget after the last stage; stage 1 first (stage 0 is the CoT run)."""
        return {"coconut.c_thought": math.ceil(latents / stages), "coconut.max_latent_stage": min(latents, stages),
                "coconut.stage_offset": 1, "coconut.pad_latent_to_max": True}

    @classmethod
    def latents_in(cls, cfg):
        """The most latents a sample gets: c per step, every step up to max_latent_stage replaced."""
        return cfg.coconut.c_thought * cfg.coconut.max_latent_stage

    @classmethod
    def validate(cls, cfg):
        c = cfg.coconut
        if c.c_thought < 1 or c.max_latent_stage < 0 or c.epochs_per_stage < 1 or c.stage_offset < 0:
            raise ConfigError("coconut: need c_thought >= 1, epochs_per_stage >= 1, max_latent_stage >= 0, "
                              "stage_offset >= 0")
        if not 0.0 <= c.uniform_prob <= 1.0:
            raise ConfigError("config key 'coconut.uniform_prob' must be in [0, 1]")

    def stage(self, epoch: int) -> int:
        """stage_offset + epoch // epochs_per_stage, capped at max_latent_stage + 1 (every step replaced)."""
        c = self.cfg.coconut
        return min(c.stage_offset + epoch // c.epochs_per_stage, c.max_latent_stage + 1)

    def reset_optimizer_at(self, epoch: int) -> bool:
        mode = self.cfg.coconut.reset_optimizer
        return mode == "epoch" or (mode == "stage" and self.stage(epoch) != self.stage(epoch - 1))

    def plan(self, ex: Example, epoch: int, rng: random.Random) -> tuple[int, int]:
        """(steps replaced, latents) for one sample at `epoch`."""
        c = self.cfg.coconut
        n_steps = len(ex["steps"])
        k = self.stage(epoch)
        if c.uniform_prob > 0 and rng.random() < c.uniform_prob:
            k = rng.randint(0, n_steps)
        if k > c.max_latent_stage:
            n_lat = c.max_latent_stage if c.pad_latent_to_max else min(n_steps, c.max_latent_stage)
            return n_steps, n_lat * c.c_thought
        return k, k * c.c_thought

    def latent_count(self, epoch, ex: Example | None = None):
        """min(max_latent_stage, stage)·c, the stage cap lowered to the sample's step count unless
        ``pad_latent_to_max`` (the reference's get_question_latent_dataset, dataset.py:199-207); it
        equals the training layout after the last stage. Without `ex`: the budget (the cap unlowered)."""
        c = self.cfg.coconut
        cap = c.max_latent_stage
        if ex is not None and not c.pad_latent_to_max:
            cap = min(cap, len(ex["steps"]))
        return min(cap, self.stage(epoch or 0)) * c.c_thought

    def collate(self, examples: list[Example], epoch, rng):
        return self.collate_plans(examples, [self.plan(ex, epoch, rng) for ex in examples])

    def collate_plans(self, examples: list[Example], plans: list[tuple[int, int]]) -> dict:
        sp = self.special
        prefix_ids, prefix_mask = left_pad([ex["q"] + [sp.bot] for ex in examples], sp.pad)
        conts, labels = [], []
        for ex, (skip, _) in zip(examples, plans):
            target = [t for s in ex["steps"][skip:] for t in s] + ex["a"]
            conts.append([sp.eot] + target)
            labels.append([IGNORE] + target)
        n_lat = [n for _, n in plans]
        cont_ids = right_pad(conts, sp.pad)
        cont_mask = right_pad([[1] * len(c) for c in conts], 0)
        return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "n_latents": torch.tensor(n_lat),
                "max_latents": max(n_lat), "cont_ids": cont_ids, "cont_mask": cont_mask,
                "labels": right_pad(labels, IGNORE), "n_skip": torch.tensor([s for s, _ in plans]),
                "n_tokens": torch.tensor(int(prefix_mask.sum()) + sum(n_lat) + int(cont_mask.sum()))}

    def rollout(self, model, batch):
        ro = run_latents(model, batch["prefix_ids"], batch["prefix_mask"], batch["n_latents"], batch["max_latents"])
        out = continue_tokens(model, ro, batch["cont_ids"], batch["cont_mask"])
        return ro, out

    def loss(self, model, batch):
        ro, out = self.rollout(model, batch)
        ce = shifted_ce(model.lm, out.last_hidden_state, batch["labels"])
        return LossOutput(ce, {"ce": ce.detach()})
