"""SIM-CoT's auxiliary step decoder: reads a latent (or a group of c latents) as a prefix of input
embeddings and is trained, with teacher forcing, to emit the reasoning step that latent stands
for, then an end marker (eos). It exists only during training (and for `simcot decode`); the
model that is evaluated and exported never contains it.

Three kinds:
- ``copy``: a separate copy of the base LM, fully trained (the references' choice; it doubles
  the weights, which is what makes it expensive at 8B).
- ``shared``: the main LM itself plus a LoRA adapter that is active only during decoder passes.
  The adapter's low-rank pairs are ordinary submodules called from forward hooks on the main
  model's linear layers, so DeepSpeed ZeRO-3 gathers them like any other module.
- ``small``: a smaller LM (fewer layers / narrower, or a given pretrained path) behind a linear
  bridge from the main model's width.

The step tokens are embedded with the *main* model's embedding (SIM-CoT's "same word
embedding"); the output head is the decoder's own (``copy``, ``small``) or the main one (``shared``).

Two settings follow the fork a method comes from: ``first_position``, the position id of the
first latent (the Coconut fork feeds 1..L, coconut.py:744; the CODI fork HF's default 0..L-1),
and ``dropout``: the Coconut fork's decoder never leaves eval mode (its ``train()`` reaches only
the base LM, coconut.py:789-793), the CODI fork's trains with dropout like any submodule.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from simcot.models.checkpointing import register_switch
from simcot.models.decoding import Prefill, body, cache_of, decode, head, unwrap, with_cache
from simcot.parallel import any_partitioned, is_distributed, rank


class LoRAPair(nn.Module):
    """x -> scale * B(A(x)); B starts at zero so the adapter starts as a no-op."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: int):
        super().__init__()
        self.a = nn.Linear(d_in, r, bias=False)
        self.b = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.b.weight)
        self.scale = alpha / r

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


def _linear_dims(m: nn.Module) -> tuple[int, int] | None:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if type(m).__name__ == "Conv1D":  # GPT-2's transposed linear (nx -> nf; not weight.shape: ZeRO-3 shards)
        return m.nx, m.nf
    return None


class StepDecoder(nn.Module):
    def __init__(self, kind: str, main_lm: nn.Module, scfg, copy_of: nn.Module | None = None,
                 first_position: int = 0, dropout: bool = True):
        super().__init__()
        self.kind = kind
        self.first_position = first_position
        self.dropout = dropout
        base = unwrap(main_lm)
        hidden = base.config.hidden_size
        self.bridge = None
        self.adapters = None
        self._active = False
        if kind == "copy":
            self.lm = copy_of if copy_of is not None else _clone(main_lm)  # default: the main model's start
            self.lm.train()
        elif kind == "small":
            self.lm = self._small_lm(base, scfg)
            self.bridge = nn.Linear(hidden, self.lm.config.hidden_size, bias=False)
        elif kind == "shared":
            self.lm = None
            register_switch(self)  # a checkpointed recompute must see the adapter as its forward did
            self.adapters = nn.ModuleDict()
            self._hooks = []
            for name, mod in base.named_modules():
                dims = _linear_dims(mod)
                if dims is None or mod is base.get_output_embeddings() or "lora" in name.lower():
                    continue
                key = name.replace(".", "__")
                self.adapters[key] = LoRAPair(dims[0], dims[1], scfg.lora_r, scfg.lora_alpha)
                self._hooks.append(mod.register_forward_hook(self._make_hook(key)))
        else:
            raise ValueError(f"unknown step decoder '{kind}' (choose from copy, shared, small)")

    @staticmethod
    def _small_lm(base, scfg):
        from transformers import AutoModelForCausalLM

        if scfg.small_model:
            return AutoModelForCausalLM.from_pretrained(scfg.small_model)
        cfg = copy.deepcopy(base.config)
        hidden = scfg.small_hidden or max(cfg.hidden_size // 2, 8)
        heads = max(1, hidden // (cfg.hidden_size // _n_heads(cfg)))
        _set_shape(cfg, hidden, scfg.small_layers, heads)
        return AutoModelForCausalLM.from_config(cfg)

    def _make_hook(self, key: str):
        def hook(module, inputs, output):
            if not self._active:
                return output
            return output + self.adapters[key](inputs[0]).to(output.dtype)

        return hook

    @contextlib.contextmanager
    def _adapter_on(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lm is not None and not self.dropout:
            self.lm.eval()  # no dropout (``shared`` has no LM of its own: it follows the main model)
        return self

    # ----------------------------------------------------------------------------- passes

    def _positions(self, rows: int, start: int, length: int, device) -> torch.Tensor:
        """(rows, length) position ids from first_position + start."""
        first = self.first_position + start
        return torch.arange(first, first + length, device=device).expand(rows, length)

    def _decoder_lm(self, main_lm):
        return main_lm if self.kind == "shared" else self.lm

    def _embed_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge(x) if self.bridge is not None else x

    def hidden(self, main_lm, prefix: torch.Tensor, step_ids: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (R, c + S, H_dec) of [prefix latents, step tokens] (teacher forcing)."""
        tok = main_lm.get_input_embeddings()(step_ids).to(prefix.dtype)
        embeds = self._embed_in(torch.cat([prefix, tok], 1))
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=step_mask.dtype, device=step_mask.device), step_mask], 1)
        ctx = self._adapter_on() if self.kind == "shared" else contextlib.nullcontext()
        with ctx:
            pos = self._positions(embeds.shape[0], 0, embeds.shape[1], embeds.device)  # (R, c + S)
            return body(self._decoder_lm(main_lm))(inputs_embeds=embeds, attention_mask=mask,
                                                   position_ids=pos).last_hidden_state

    def output_head(self, main_lm) -> nn.Module:
        return head(self._decoder_lm(main_lm))

    @torch.no_grad()
    def generate(self, main_lm, prefix: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
        """Greedy decoding of each prefix's step through the shared decode loop: (R, <= max_new_tokens),
        pad after eos. Prefixes are c latents each (no padding, so no mask)."""
        lm = self._decoder_lm(main_lm)
        stack, out_head, emb = body(lm), self.output_head(main_lm), main_lm.get_input_embeddings()

        def step(tok: torch.Tensor, cache, **kw) -> torch.Tensor:  # (b,) -> (b, V)
            e = self._embed_in(emb(tok)[:, None].to(prefix.dtype))  # (b, 1, H_dec)
            h = stack(inputs_embeds=e, use_cache=True, **with_cache(stack, cache), **kw).last_hidden_state
            return out_head(h[:, -1])

        ctx = self._adapter_on() if self.kind == "shared" else contextlib.nullcontext()
        with ctx:
            rows, c = prefix.shape[:2]
            out = stack(inputs_embeds=self._embed_in(prefix), use_cache=True,
                        position_ids=self._positions(rows, 0, c, prefix.device))
            # positions continue after the c latents (from first_position: 1 on Coconut, 0 on CODI)
            state = Prefill(out_head(out.last_hidden_state[:, -1]), cache_of(out), None,
                            self._positions(rows, c, 1, prefix.device)[:, 0].clone())
            return decode(step, state, max_new_tokens, eos_id, pad_id, synced=is_distributed(), lm=lm)


def _clone(main_lm: nn.Module) -> nn.Module:
    """A trainable copy of the main LM (LoRA merged in); under ZeRO-3 built partitioned and filled
    parameter by parameter, since a deepcopy of empty shards copies nothing."""
    base = unwrap(main_lm)
    if not any_partitioned(base):
        src = copy.deepcopy(main_lm)
        return src.merge_and_unload() if hasattr(src, "merge_and_unload") else src
    if base is not main_lm:
        raise ValueError("simcot.decoder=copy of a LoRA model under ZeRO-3 is not supported; "
                         "use simcot.decoder=shared (the references' 8B setting is LoRA + decoder)")
    import deepspeed
    from transformers import AutoModelForCausalLM

    clone = AutoModelForCausalLM.from_config(base.config)  # partitioned by zero.Init (HfDeepSpeedConfig is alive)
    src = dict(base.named_parameters())
    for name, p in clone.named_parameters():
        with deepspeed.zero.GatheredParameters([p, src[name]], modifier_rank=0):
            if rank() == 0:
                with torch.no_grad():
                    p.copy_(src[name])
    return clone


def _n_heads(cfg) -> int:
    return getattr(cfg, "num_attention_heads", None) or cfg.n_head


def _set_shape(cfg, hidden: int, layers: int, heads: int) -> None:
    if cfg.model_type == "gpt2":
        cfg.n_embd, cfg.n_layer, cfg.n_head = hidden, layers, heads
    else:
        ratio = cfg.intermediate_size / cfg.hidden_size
        cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
        cfg.num_attention_heads = cfg.num_key_value_heads = heads
        cfg.intermediate_size = int(hidden * ratio)
        if getattr(cfg, "head_dim", None):
            cfg.head_dim = hidden // heads
