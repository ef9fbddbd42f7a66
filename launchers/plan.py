"""`simcot plan`: will a run fit? Per-GPU and per-node CPU memory before renting the machines.

Model states (parameters, gradients, optimizer) come from DeepSpeed's own estimators, fed with
the exact parameter counts of a meta-device model (no weights are allocated). LoRA is counted by
hand: frozen bf16 weights plus full training state for the adapter. On top come the activations
of one micro-batch of the latent rollout (bf16), estimated from the shapes:

- per token and layer, the tensors a transformer block keeps for backward without activation
  checkpointing: ~ (10 h + 3 i) elements for LLaMA-style blocks (h hidden, i MLP width; attention
  by SDPA, no s^2 scores); ~ 2 h with non-reentrant checkpointing (the block inputs);
- the rollout's KV caches: latent step j attends over P + j keys and keeps them for backward,
  so the rollout holds sum_j (P + j) x 2 x kv_width per layer;
- methods: CODI adds the teacher sequence, SIM-CoT a decoder pass over its steps (and, with
  ``--decoder copy``, a second copy of the model states).
The estimate is deliberately simple: it is an order-of-magnitude planner, and says so.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

from simcot.options import opt

GiB = 2**30


@dataclass
class PlanInputs:
    """What a memory plan is computed from: ``make_plan``'s arguments and ``simcot plan``'s flags
    (``plan_inputs`` reads all but the layout and the GPU size from a run config)."""

    model: str = opt("llama-3.1-8b", "Preset or HF path/name (only its config is read)")
    gpus: int = opt(8, "GPUs per node")
    nodes: int = opt(1, "Nodes")
    zero: int = opt(3, "ZeRO stage 0..3")
    offload: str = opt("none", "none | optimizer | all (optimizer and parameters, ZeRO-3)")
    lora: int = opt(0, "LoRA rank (0 = full fine-tuning)")
    micro_batch: int = opt(4, "Samples per forward pass per GPU")
    seq_len: int = opt(256, "Tokens per sample (question, steps and answer)")
    n_latents: int = opt(6, "Latents of the rollout")
    method: str = opt("codi", "The objective (CODI adds a teacher pass, SIM-CoT a decoder)")
    decoder: str = opt("copy", "SIM-CoT step decoder: copy doubles the model states")
    gpu_memory: float = opt(80.0, "GiB per GPU")
    checkpointing: bool = opt(False, "Activation checkpointing")


def plan_inputs(cfg) -> dict:
    """The PlanInputs a run config decides: the model, the ZeRO stage and offload of the ds_config
    the run builds, LoRA, micro-batch, sequence length (data.max_tokens, when it caps it), the
    method and its latent budget (the method's own ``latents_in``), the step decoder, checkpointing."""
    from simcot.train.config import RunShape
    from simcot.train.engines.ds_engine import build_ds_config
    from simcot.train.methods import METHODS

    zero = build_ds_config(cfg, 1, RunShape.accumulation(cfg.train), on_cpu=False)["zero_optimization"]
    offloaded = {k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"}
    # the planner counts offloaded parameters as 'all' (it has no parameters-only layout)
    out = {"model": cfg.model.name, "zero": zero["stage"], "lora": cfg.model.lora_r,
           "offload": "all" if "offload_param" in offloaded else "optimizer" if offloaded else "none",
           "micro_batch": cfg.train.micro_batch_size, "n_latents": METHODS[cfg.method].latents_in(cfg),
           "method": cfg.method, "decoder": cfg.simcot.decoder, "checkpointing": cfg.model.gradient_checkpointing}
    return {**out, "seq_len": cfg.data.max_tokens} if cfg.data.max_tokens > 0 else out


@dataclass
class Plan:
    model: str
    params: int
    largest_layer: int
    trainable: int
    gpus: int
    nodes: int
    zero: int
    offload: str
    gpu_model_states_gib: float
    cpu_model_states_gib_per_node: float
    activations_gib: float
    gpu_total_gib: float
    gpu_memory_gib: float
    fits: bool

    def table(self) -> str:
        rows = [("model", f"{self.model}: {self.params / 1e9:.2f}B parameters ({self.trainable / 1e6:.1f}M trainable), "
                          f"largest layer {self.largest_layer / 1e6:.0f}M"),
                ("layout", f"{self.nodes} node(s) x {self.gpus} GPU(s), ZeRO-{self.zero}, offload {self.offload}"),
                ("per GPU: model states", f"{self.gpu_model_states_gib:.1f} GiB"),
                ("per GPU: activations", f"{self.activations_gib:.1f} GiB (one micro-batch of the rollout, bf16)"),
                ("per GPU: total", f"{self.gpu_total_gib:.1f} GiB of {self.gpu_memory_gib:.0f} GiB -> "
                                   f"{'fits' if self.fits else 'does NOT fit'}"),
                ("per node: CPU memory", f"{self.cpu_model_states_gib_per_node:.1f} GiB (offloaded states and "
                                         f"DeepSpeed's buffers)")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def count_params(name: str) -> tuple[int, int, object]:
    """(total, largest single parameter, HF config) of a preset or a HF path, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from simcot.models.presets import get_preset

    preset = get_preset(name)
    cfg = preset.hf_config() if preset else AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    sizes = [p.numel() for p in model.parameters()]
    return sum(sizes), max(sizes), cfg


def _dims(cfg) -> tuple[int, int, int, int]:
    """(hidden, mlp width, layers, kv width) of a LLaMA- or GPT-2-style config."""
    if cfg.model_type == "gpt2":
        return cfg.n_embd, 4 * cfg.n_embd, cfg.n_layer, cfg.n_embd
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads * head_dim


def activation_bytes(cfg, micro_batch: int, seq_len: int, n_latents: int, method: str, checkpointing: bool) -> float:
    from simcot.train.methods import METHODS

    h, inter, layers, kv = _dims(cfg)
    per_token_layer = (2 * h if checkpointing else 10 * h + 3 * inter) * 2  # bf16
    tokens = micro_batch * (seq_len + n_latents)
    m = METHODS[method]
    if m.teacher_pass:
        tokens += micro_batch * seq_len  # the teacher's question + CoT + answer
    if m.decoder_pass:
        tokens += micro_batch * max(n_latents, 1) * 24  # decoded steps (~24 tokens each)
    prefix = seq_len // 2
    kv_cache = layers * micro_batch * sum(prefix + j for j in range(n_latents)) * 2 * kv * 2
    return per_token_layer * layers * tokens + kv_cache


def make_plan(*args, **kw) -> Plan:
    """The plan for ``PlanInputs(*args, **kw)``."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; plan's stdout is its report
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from simcot.train.methods import METHODS

    p = PlanInputs(*args, **kw)
    model, gpus, nodes, zero, offload, lora, method = p.model, p.gpus, p.nodes, p.zero, p.offload, p.lora, p.method
    if offload not in ("none", "optimizer", "all"):
        raise ValueError("--offload is none | optimizer | all (optimizer and parameters)")
    if offload == "all" and zero != 3:
        raise ValueError("--offload all (parameter offload) needs --zero 3")
    total, largest, cfg = count_params(model)
    n = gpus * nodes
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    copies = 2 if METHODS[method].decoder_pass and p.decoder == "copy" else 1  # a copy decoder trains a second model
    if lora:
        h, inter, layers, _ = _dims(cfg)
        trainable = layers * lora * (4 * (h + h) + 3 * (h + inter))  # q,k,v,o and the three MLP projections
        shard = n if zero == 3 else 1
        gpu = 2 * total / shard + 18 * trainable / (n if zero >= 2 else 1)
        cpu = 0.0
    else:
        trainable = total * copies
        if zero == 3:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                trainable, largest, gpus, nodes, cpu_offload=offload != "none", cpu_offload_params=offload == "all",
                zero_init=True)
        elif zero in (1, 2):
            cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, gpus, nodes, cpu_offload=offload != "none")
        else:
            cpu, gpu = 0.0, 18.0 * trainable  # plain data parallel: fp32 master, Adam moments, bf16 copy, grads
    act = activation_bytes(cfg, p.micro_batch, p.seq_len, p.n_latents, method, p.checkpointing)
    gpu_total = (gpu + act) / GiB
    return Plan(model, total, largest, trainable, gpus, nodes, zero, offload, gpu / GiB, cpu / GiB, act / GiB,
                gpu_total, p.gpu_memory, gpu_total <= p.gpu_memory)
