"""SemCoT (He et al., arXiv 2510.24940): a light generator writes implicit tokens that a frozen
answering model reads, pulled toward the explicit reasoning by a contrastive sentence encoder.

One run, four phases by epoch (``semcot.*_epochs``), each training one part at its own lr
(parameter groups scaled to 0 are frozen exactly) with a fresh optimizer at every change:

1. encoder projection, 2. whole encoder: InfoNCE between a reasoning text and its condensed
   form, both read as the frozen answering model's activations at the encoder's first layer;
3. generator projection, 4. generator (body, projection, ``<thought>``): with the encoder frozen
   and its targets for every training example computed once,
   ``alpha * (1 - cos(encoder(implicit), target)) + (1 - alpha) * CE``, the CE being the
   frozen answering model's on the answer after ``[question, implicit tokens, answer prompt]``,
   its gradient flowing through the frozen model into the generator.

With ``semcot.encoder=minilm`` the encoder is the off-the-shelf all-MiniLM-L6-v2, frozen, with
no encoder phases; the implicit tokens enter it through a linear adapter trained with the
generator's projection.

Pairs: a record's ``reasoning`` text (GSM8K: the natural-language solution) against its
``condensed_reasoning`` (default: the equation-only steps); records with steps only pair the
steps with their results (``<<3+4=7>>`` -> ``7``).

Deliberate differences from the reference: batched with padding everywhere (it runs one sample
at a time); the implicit tokens are the states at the N thought slots (it keeps the last
question state and the first N-1 slots); evaluation uses the training N (its default evaluates
with 1 of the 5 trained); the loss is a batch mean (it sums 4 samples); the encoder slice is
causal (see simcot.models.sentence_encoder).
"""

from __future__ import annotations

import enum
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from simcot.models.decoding import Prefill, body, cache_of, left_pad, positions, unwrap
from simcot.models.loading import is_random_init
from simcot.models.sentence_encoder import MiniLMEncoder, SliceEncoder, info_nce, n_layers, parse_slice
from simcot.models.tanh_gelu import cpu_tanh_gelu
from simcot.models.thought_generator import ThoughtGenerator, build_generator_lm, hidden_size
from simcot.train.config import ConfigError
from simcot.train.data.examples import Example
from simcot.train.engines.engine import param_groups
from simcot.train.methods.base import IGNORE, LossOutput, Method, Prompt, lm_batch, right_pad, shifted_ce

log = logging.getLogger(__name__)

class Phase(enum.Enum):
    """SemCoT's phases in training order; a phase's value is the parameter group it introduces."""

    ENCODER_PROJ = "encoder_proj"
    ENCODER = "encoder"
    GENERATOR_PROJ = "generator_proj"
    GENERATOR = "generator"

    @property
    def trains_encoder(self) -> bool:  # else the generator, against the frozen encoder's targets
        return self in (Phase.ENCODER_PROJ, Phase.ENCODER)

    @property
    def trains_body(self) -> bool:  # the part's body too, not only its projection
        return self in (Phase.ENCODER, Phase.GENERATOR)

    @property
    def trained_groups(self) -> tuple[str, ...]:
        """The parameter groups this phase trains (at its lr; every other group is frozen)."""
        proj = Phase.ENCODER_PROJ if self.trains_encoder else Phase.GENERATOR_PROJ
        return (proj.value, self.value) if self.trains_body else (proj.value,)


PHASES = tuple(Phase)


@contextmanager
def frozen(module: torch.nn.Module):
    """Gradients pass *through* `module` but none accumulate in its parameters."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def step_results(steps: list[str]) -> str:
    """The condensed form of equation steps: each step's result (the text after its last '=')."""
    out = []
    for s in steps:
        r = s.strip().strip("<>").rsplit("=", 1)[-1].strip()
        out.append(r or s)
    return " ".join(out)


def reasoning_pair(ex: Example) -> tuple[str, str]:
    """(reasoning text, condensed form) of an example; see the module docstring."""
    steps = " ".join(ex["steps_text"])
    if ex.get("reasoning"):
        return ex["reasoning"], ex.get("condensed_reasoning") or steps
    return steps, ex.get("condensed_reasoning") or step_results(ex["steps_text"])


class SemCoT(Method):
    name = "semcot"
    sweepable = False  # its answerer is a trained run of its own
    auxiliary_parts = ("encoder",)  # it only shapes the generator's training

    @classmethod
    def latent_budget(cls, latents, stages):
        return {"semcot.n_thoughts": latents}

    def __init__(self, cfg, tok, special, inference=False):
        super().__init__(cfg, tok, special, inference)
        self.targets: torch.Tensor | None = None  # (n_train, encoder_dim), by example idx
        self._pair_ids: dict[int, tuple[list[int], list[int]]] = {}
        self.minilm = cfg.semcot.encoder == "minilm"

    @classmethod
    def validate(cls, cfg):
        s = cfg.semcot
        if s.n_thoughts < 1:
            raise ConfigError("config key 'semcot.n_thoughts' must be >= 1")
        if not 0.0 <= s.alpha <= 1.0:
            raise ConfigError(f"config key 'semcot.alpha' must be in [0, 1], got {s.alpha}")
        if s.temperature <= 0:
            raise ConfigError("config key 'semcot.temperature' must be > 0")
        epochs = (s.encoder_proj_epochs, s.encoder_epochs, s.generator_proj_epochs)
        if min(epochs) < 0 or sum(epochs) >= cfg.train.epochs:
            raise ConfigError(f"semcot phases take {sum(epochs)} epochs before the generator's full phase, "
                              f"which needs at least one more: train.epochs is {cfg.train.epochs}")
        if s.encoder == "minilm" and (s.encoder_proj_epochs or s.encoder_epochs):
            raise ConfigError("semcot.encoder=minilm is trained already: set semcot.encoder_proj_epochs and "
                              "semcot.encoder_epochs to 0")
        if cfg.model.lora_r > 0:
            raise ConfigError("semcot keeps the answering model frozen: model.lora_r must be 0")
        if is_random_init(cfg.model) and not cfg.train.init_from and not cfg.train.resume:
            raise ConfigError("semcot needs a trained answering model: set train.init_from to a CoT run "
                              "(see launchers/recipes/semcot-toy.yaml) or model.name to a pretrained model")

    # ------------------------------------------------------------------------------- model

    def setup_model(self, model):
        s = self.cfg.semcot
        model.lm.requires_grad_(False)
        d = hidden_size(model.config)
        if self.builds("encoder"):
            if s.encoder == "minilm":
                model.encoder = MiniLMEncoder(d)
            else:
                start, end = parse_slice(s.encoder_layers, n_layers(model.config))
                model.encoder = SliceEncoder(model.lm, start, end, s.encoder_dim)
        model.generator = ThoughtGenerator(build_generator_lm(s.generator, model.lm, len(self.tok)), d)

    def param_groups(self, model, weight_decay):
        if self.minilm:  # a frozen encoder; its input adapter learns with the generator's projection
            parts = {"generator_proj": [model.generator.proj, model.encoder.adapter], "generator": [model.generator.lm]}
        else:
            parts = {"encoder_proj": [model.encoder.proj], "encoder": [model.encoder.body],
                     "generator_proj": [model.generator.proj], "generator": [model.generator.lm]}
        groups = []
        for name, modules in parts.items():
            for g in param_groups(torch.nn.ModuleList(modules), weight_decay):
                if g["params"]:
                    groups.append({**g, "name": name})
        groups.append({"params": [model.generator.thought], "weight_decay": 0.0, "name": "generator"})
        return groups

    # ------------------------------------------------------------------------------ phases

    def phase(self, epoch: int) -> Phase:
        s = self.cfg.semcot
        ends = (s.encoder_proj_epochs, s.encoder_proj_epochs + s.encoder_epochs,
                s.encoder_proj_epochs + s.encoder_epochs + s.generator_proj_epochs)
        return PHASES[sum(epoch >= e for e in ends)]

    def stage(self, epoch):  # the phase's number, as the loop logs it
        return PHASES.index(self.phase(epoch))

    def reset_optimizer_at(self, epoch):
        return self.phase(epoch) != self.phase(epoch - 1)

    def lr_scales(self, epoch):
        s, base = self.cfg.semcot, self.cfg.train.lr
        phase = self.phase(epoch)
        lr = {Phase.ENCODER_PROJ: s.encoder_proj_lr, Phase.ENCODER: s.encoder_lr,
              Phase.GENERATOR_PROJ: s.generator_proj_lr, Phase.GENERATOR: s.generator_lr}[phase]
        return {p.value: (lr / base if p.value in phase.trained_groups else 0.0) for p in PHASES}

    def before_epoch(self, engine, epoch, train_examples: list[Example]):
        if not self.phase(epoch).trains_encoder and self.targets is None:
            self.targets = self.compute_targets(engine, train_examples)

    @torch.no_grad()
    def compute_targets(self, engine, examples: list[Example], batch_size: int = 64) -> torch.Tensor:
        """The frozen encoder's vector of every example's reasoning text, once (every rank makes
        the same forwards, as ZeRO-3 requires)."""
        module = engine.module
        was_training = module.training
        module.eval()
        out, dev = None, engine.device
        n = max((ex["idx"] for ex in examples), default=-1) + 1
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            if self.minilm:
                z = engine.forward(lambda m, texts: m.encoder.encode_texts(texts, dev),
                                   [reasoning_pair(ex)[0] for ex in chunk])
            else:
                ids = right_pad([self.pair_ids(ex)[0] for ex in chunk], self.special.pad)
                mask = right_pad([[1] * len(self.pair_ids(ex)[0]) for ex in chunk], 0)
                z = engine.forward(self._encode_texts, ids.to(dev), mask.to(dev))
            out = torch.zeros(n, z.shape[-1]) if out is None else out
            out[torch.tensor([ex["idx"] for ex in chunk])] = z.float().cpu()
        module.train(was_training)
        log.info("semcot: encoder targets cached for %d training examples", len(examples))
        return out

    def _encode_texts(self, model, ids, mask, train_body: bool = False):
        feats = SliceEncoder.features(model.lm, ids, mask, model.encoder.start)
        return model.encoder(feats, mask, train_body=train_body)

    # ------------------------------------------------------------------------------- batches

    def pair_ids(self, ex: Example) -> tuple[list[int], list[int]]:
        key = ex["idx"]
        if key not in self._pair_ids:
            text, condensed = reasoning_pair(ex)
            enc = [self.tok.encode(t, add_special_tokens=False) or [self.special.eos] for t in (text, condensed)]
            self._pair_ids[key] = (enc[0], enc[1])
        return self._pair_ids[key]

    def _slots(self) -> list[int]:
        return [self.special.latent] * self.cfg.semcot.n_thoughts

    def collate(self, examples: list[Example], epoch, rng):
        phase = self.phase(epoch)
        if phase.trains_encoder:
            full, cond = zip(*(self.pair_ids(ex) for ex in examples))
            return {"phase": phase, "full_ids": right_pad(list(full), self.special.pad),
                    "full_mask": right_pad([[1] * len(t) for t in full], 0),
                    "cond_ids": right_pad(list(cond), self.special.pad),
                    "cond_mask": right_pad([[1] * len(t) for t in cond], 0),
                    "n_tokens": torch.tensor(sum(len(t) for t in full + cond))}
        if self.targets is None:
            raise RuntimeError("semcot: encoder targets are computed in before_epoch; call it before collate")
        slots = self._slots()
        gen_ids, gen_mask = left_pad([ex["q"] + slots for ex in examples], self.special.pad)
        seqs = [ex["q"] + slots + ex["a"] for ex in examples]
        labels = [[IGNORE] * (len(ex["q"]) + len(slots) + ex["a_marker"]) + ex["a"][ex["a_marker"]:] for ex in examples]
        answer = lm_batch(seqs, labels, self.special.pad)
        return {"phase": phase, "gen_ids": gen_ids, "gen_mask": gen_mask, "ids": answer["input_ids"],
                "mask": answer["attention_mask"], "labels": answer["labels"],
                "targets": self.targets[torch.tensor([ex["idx"] for ex in examples])],
                "n_tokens": answer["n_tokens"] + int(gen_mask.sum())}

    # -------------------------------------------------------------------------------- losses

    def implicit_tokens(self, model, gen_ids, gen_mask, train_body: bool = True) -> torch.Tensor:
        return model.generator(gen_ids, gen_mask, self.special.latent, self.cfg.semcot.n_thoughts, train_body)

    def answer_hidden(self, model, ids, mask, implicit):
        """The answering model's final states on ids whose slots hold the implicit tokens."""
        slots = ids == self.special.latent
        emb = model.embed(ids)
        emb = emb.masked_scatter(slots.unsqueeze(-1), implicit.to(emb.dtype))
        return body(model.lm)(inputs_embeds=emb, attention_mask=mask, position_ids=positions(mask)).last_hidden_state

    def loss(self, model, batch):
        phase = batch["phase"]
        if phase.trains_encoder:
            a = self._encode_texts(model, batch["full_ids"], batch["full_mask"], train_body=phase.trains_body)
            b = self._encode_texts(model, batch["cond_ids"], batch["cond_mask"], train_body=phase.trains_body)
            loss = info_nce(a, b, self.cfg.semcot.temperature)
            sims = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
            hit = (sims.argmax(-1) == torch.arange(len(a), device=a.device)).float().mean()
            return LossOutput(loss, {"info_nce": loss.detach(), "pair_accuracy": hit})
        alpha = self.cfg.semcot.alpha
        implicit = self.implicit_tokens(model, batch["gen_ids"], batch["gen_mask"], train_body=phase.trains_body)
        with frozen(model.encoder.body if self.minilm else model.encoder):
            z = model.encoder(implicit, torch.ones(implicit.shape[:2], dtype=torch.long, device=implicit.device))
        semantic = (1 - F.cosine_similarity(z.float(), batch["targets"].float(), dim=-1)).mean()
        ce = shifted_ce(model.lm, self.answer_hidden(model, batch["ids"], batch["mask"], implicit), batch["labels"])
        loss = alpha * semantic + (1 - alpha) * ce
        return LossOutput(loss, {"semantic": semantic.detach(), "ce": ce.detach()})

    # ---------------------------------------------------------------------------- evaluation

    def eval_latents(self, epoch=None, ex: Example | None = None):
        return self.cfg.eval.n_latents if self.cfg.eval.n_latents >= 0 else self.cfg.semcot.n_thoughts

    def eval_prompt(self, ex: Example, epoch=None, n_latents=None):
        n = self.eval_latents(epoch, ex) if n_latents is None else n_latents
        return Prompt(ex["q"] + [self.special.latent] * n + ex["a"][:ex["a_marker"]], n, ex)

    @torch.no_grad()
    def prefill(self, model, prompts: list[Prompt], device) -> Prefill:
        """Generator (one parallel forward), then the answering model's prompt with the implicit tokens."""
        n = prompts[0].n_latents  # one count for the batch: the generator makes n states in one forward
        if any(p.n_latents != n for p in prompts):
            raise ValueError("semcot evaluates a batch with one implicit-token count")
        ids, mask = left_pad([p.ids for p in prompts], self.special.pad)
        ids, mask = ids.to(device), mask.to(device)
        with cpu_tanh_gelu(unwrap(model.lm), device), cpu_tanh_gelu(model.generator, device):  # as every eval forward
            emb = model.embed(ids)
            if n > 0:
                gen_ids, gen_mask = left_pad([p.ex["q"] + [self.special.latent] * n for p in prompts],
                                             self.special.pad)
                implicit = model.generator(gen_ids.to(device), gen_mask.to(device), self.special.latent, n)
                emb = emb.masked_scatter((ids == self.special.latent).unsqueeze(-1), implicit.to(emb.dtype))
            pos = positions(mask)
            out = model.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True,
                           logits_to_keep=1)
        return Prefill(out.logits[:, -1], cache_of(out), mask, pos[:, -1] + 1)
