"""What a method is: an object that turns a batch of tokenized records into a loss.

A method decides the token layout of its training sequences (``collate``), computes its
objective inside the model's forward (``loss``), and says how evaluation prompts look
(``eval_prompt``). The training loop, evaluation, checkpoints and tracking are shared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch

from simcot.kernels import fused_linear_cross_entropy, gathered
from simcot.models.decoding import Prefill, head, left_pad, prefill_ids
from simcot.models.latent_lm import LatentLM
from simcot.train.engines.engine import param_groups
from simcot.train.data.examples import Example
from simcot.train.data.tokenizer import SpecialIds

IGNORE = -100


class LossOutput(dict):
    """An objective's result: ``loss``, the one scalar that is backpropagated, and ``parts``, its
    logged components (detached). A dict, because DeepSpeed's ZeRO-3 hooks look for tensors in
    dicts, lists and tuples returned by a module's forward."""

    def __init__(self, loss: torch.Tensor, parts: dict[str, torch.Tensor] | None = None):
        super().__init__(loss=loss, parts=dict(parts or {}))

    @property
    def loss(self) -> torch.Tensor:
        return self["loss"]

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        return self["parts"]


@dataclass
class Prompt:
    ids: list[int]  # prompt tokens (for latent methods: up to and including <bot>)
    n_latents: int = 0
    ex: Example | None = None  # the example (gold steps for step-decoding metrics)


class Method:
    name: ClassVar[str]
    uses_latents: ClassVar[bool] = False
    # What sweeps and the memory planner ask of a method, without building one:
    sweepable: ClassVar[bool] = True  # a cell of `simcot sweep` (SemCoT needs a trained answerer first)
    base_method: ClassVar[str | None] = None  # SIM-CoT: the method its gain is measured against
    starts_from: ClassVar[str | None] = None  # the method of the run its training starts from (train.init_from)
    teacher_pass: ClassVar[bool] = False  # a second forward over question + CoT + answer (CODI's teacher)
    decoder_pass: ClassVar[bool] = False  # a step-decoder forward over the decoded steps (SIM-CoT)
    # Submodules of the model that only shape training (SIM-CoT's step decoder, SemCoT's encoder):
    # an inference model (evaluation, export) does not build them, and loading a checkpoint into
    # one skips their weights.
    auxiliary_parts: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def latent_budget(cls, latents: int, stages: int) -> dict:
        """Config overrides that give this method `latents` continuous thoughts, for a task whose
        curriculum has `stages` stages (the latent budget, spelled in the method's own keys)."""
        return {}

    @classmethod
    def latents_in(cls, cfg) -> int:
        """The latent budget `cfg` gives this method (what ``simcot plan`` sizes the rollout by): the
        inverse of latent_budget, read from the one key it sets (0 when it sets none)."""
        keys = list(cls.latent_budget(1, 1))
        if len(keys) > 1:
            raise NotImplementedError(f"{cls.name}: a budget spelled in several keys needs its own latents_in")
        return int(attrgetter(keys[0])(cfg)) if keys else 0

    def __init__(self, cfg, tok, special: SpecialIds, inference: bool = False):
        self.cfg = cfg
        self.tok = tok
        self.special = special
        self.inference = inference  # build only what evaluation needs (no auxiliary_parts)
        # set by the builder when a checkpoint's weights overwrite the model right after set-up: the
        # extra modules then need only their shapes, not starting weights worth loading
        self.restoring = False

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise ConfigError for settings this method cannot run with."""

    def setup_model(self, model: LatentLM) -> None:
        """Add the method's extra modules (projection, step decoder) to a fresh model."""

    def builds(self, part: str) -> bool:
        """Whether ``setup_model`` adds `part`: an auxiliary part only to a training model."""
        return not (self.inference and part in self.auxiliary_parts)

    def auxiliary_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the auxiliary parts (what an inference model leaves out)."""
        return tuple(f"{part}." for part in self.auxiliary_parts)

    def stage(self, epoch: int) -> int:
        """Curriculum stage of an epoch (0 for methods without a curriculum)."""
        return 0

    def reset_optimizer_at(self, epoch: int) -> bool:
        """Start `epoch` with a fresh optimizer (Coconut's reset_optimizer)."""
        return False

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; a group's ``name`` is what ``lr_scales`` refers to."""
        return param_groups(model, weight_decay)

    def lr_scales(self, epoch: int) -> dict[str, float] | None:
        """Per-group multipliers of the scheduled lr for `epoch` (None: every group at 1)."""
        return None

    def before_epoch(self, engine, epoch: int, train_examples: list[Example]) -> None:
        """Work the objective needs done before `epoch` starts (or resumes)."""

    def collate(self, examples: list[Example], epoch: int, rng: random.Random) -> dict:
        raise NotImplementedError

    def loss(self, model: LatentLM, batch: dict) -> LossOutput:
        raise NotImplementedError

    def eval_latents(self, epoch: int | None, ex: Example | None = None) -> int:
        """Latents an evaluation prompt gets after training up to `epoch` (0: no latents); with `ex`
        the count for that sample (Coconut's depends on its step count), without it the method's budget."""
        return 0

    def eval_prompt(self, ex: Example, epoch: int | None = None, n_latents: int | None = None) -> Prompt:
        """The evaluation prompt of `ex` after training up to `epoch`; `n_latents` forces the latent
        count (``eval.latent_sweep``), else the method decides it per sample."""
        raise NotImplementedError

    def prefill(self, model: LatentLM, prompts: list[Prompt], device: torch.device) -> Prefill:
        """Run the prompts (left-padded) and return the state greedy decoding continues from."""
        ids, mask = left_pad([p.ids for p in prompts], self.special.pad)
        return prefill_ids(model.lm, ids.to(device), mask.to(device))


# ------------------------------------------------------------------------------ shared helpers


def right_pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def lm_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    """Right-padded causal-LM batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    ids = right_pad(seqs, pad_id)
    mask = right_pad([[1] * len(s) for s in seqs], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": right_pad(labels, IGNORE),
            "n_tokens": torch.tensor(int(mask.sum()))}


def shifted_ce(lm, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of `hidden` (B, T, H) against `labels` (B, T), IGNORE skipped.

    Only supervised positions reach the head, through the fused linear cross-entropy, so the
    (tokens x vocabulary) logits are never materialised. The head is never called as a module,
    so under ZeRO-3 its parameters are gathered here, once per call.
    """
    h = hidden[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE
    out = head(lm)
    with gathered(out.weight, out.bias):
        return fused_linear_cross_entropy(h[keep], out.weight, y[keep], bias=out.bias, reduction=reduction)
