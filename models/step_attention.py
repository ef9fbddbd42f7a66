"""The attention of single-position steps on a reserved KV cache (evaluation's latent steps, `<eot>`,
each decoded token) on the CPU.

A step there runs `cached_step_attention`: transformers' eager attention math, the same ops in
the same order as Llama's `eager_attention_forward` (the same bits, `STANDARD_ATTENTION` lists
the families checked). One query row against the cache is two small matrix multiplies, which the
CPU's fused sdpa kernel (flash attention for CPU) tiles as if the query were long, several times
slower per call at batch 256. Under torch.compile (`--eval.compile`) the step calls it as one
custom op, `simcot::step_attention`, which inductor leaves whole while it fuses everything around
it (norms, rotary halves, activations): inductor's own code for the one-row attention is slower
on the CPU than the two eager matmuls, and made the compiled step slower than the eager one at
batch 256 (benchmarks/README.md, rollout). Elsewhere (GPUs) a step runs the model's own attention.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

STEP_ATTENTION = "simcot_step"  # the name under which transformers' attention modules find it


def cached_step_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                          scaling: float, n_rep: int) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for query (B, H, Tq, D) against key/value (B, H / n_rep, T, D)
    with an additive mask (B, 1, Tq, T) or None; (B, Tq, H, D) contiguous, as transformers' eager."""
    if n_rep > 1:  # grouped-query attention: each key/value head serves n_rep query heads (repeat_kv)
        b, kv_heads, t, d = key.shape
        key = key[:, :, None].expand(b, kv_heads, n_rep, t, d).reshape(b, kv_heads * n_rep, t, d)
        value = value[:, :, None].expand(b, kv_heads, n_rep, t, d).reshape(b, kv_heads * n_rep, t, d)
    weights = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)  # (B, H, Tq, T); in place: fresh tensor
    if mask is not None:
        weights.add_(mask)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Tq, H, D)


@torch.library.custom_op("simcot::step_attention", mutates_args=())
def _step_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scaling: float, n_rep: int) -> torch.Tensor:
    return cached_step_attention(query, key, value, mask, scaling, n_rep)


@_step_attention_op.register_fake
def _(query, key, value, mask, scaling, n_rep):
    b, heads, tq, d = query.shape
    return query.new_empty(b, tq, heads, d)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: (output (B, Tq, H, D), no weights)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    n_rep = query.shape[1] // key.shape[1]
    if torch.compiler.is_compiling():  # one opaque op in the graph
        return _step_attention_op(query, key, value, attention_mask, scale, n_rep), None
    return cached_step_attention(query, key, value, attention_mask, scale, n_rep), None  # eager: no op dispatch


AttentionInterface.register(STEP_ATTENTION, _attention)


# Model families whose eager attention is that math (transformers 5.25: Llama's function, copied into
# the others; GPT-2's the same with its softmax in the query's dtype, which is fp32 for an fp32
# model). Others (logit soft-capping, attention sinks) run their own eager attention in a step.
STANDARD_ATTENTION = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2")


def step_attention(impl: str | None, device: torch.device, model_type: str | None = None) -> str | None:
    """The attention a single-position step runs on a reserved cache, for a model of `model_type`
    on attention `impl`: on the CPU, for sdpa or eager attention (the ready masks' formats),
    `STEP_ATTENTION` for a family in `STANDARD_ATTENTION` and the model's own eager attention for
    any other; the model's own `impl` elsewhere."""
    if impl not in ("sdpa", "eager") or device.type != "cpu":
        return impl
    return STEP_ATTENTION if model_type in STANDARD_ATTENTION else "eager"
