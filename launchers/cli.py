"""The ``simcot`` command line (python-fire): ``simcot COMMAND [options]``.

Each command declares its options as one dataclass (``TrainOptions``, ``DataOptions``, ...) whose
docstring is its usage and description; ``simcot COMMAND --help`` and the parsing of its
arguments come from it (``simcot.options``). Commands that run or read a run config (train, eval,
decode, plan, launch, sweep) pass every other ``--section.key`` on to it: those are the fields of
the config dataclasses, which a YAML file sets many at once and command-line flags override.

Every expected failure (bad config or data, a missing or damaged checkpoint, an unknown model, a
non-finite loss) is one line on stderr, ``simcot: error: ...``, and a non-zero exit; ``--debug``
(any command) or ``SIMCOT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from simcot.launchers.plan import PlanInputs
from simcot.options import fields_of, opt, options_help, parse_options, required_fields
from simcot.train.config import ALIASES, Config, ConfigError, DataConfig, help_text

USAGE = """usage: simcot COMMAND [options]

commands:
  train     train a model (default: CoT-SFT of tiny-llama on generated arithmetic, CPU, a few minutes)
  eval      evaluate a checkpoint on a split (batched greedy decoding, exact match)
  data      preview a data source or write it as jsonl / GSM8K-Aug / iCoT text
  decode    decode a SIM-CoT model's latents into text with its step decoder
  export    write a checkpoint as a Hugging Face model folder (ZeRO shards consolidated, LoRA merged)
  plan      per-GPU / per-node memory of a run, and whether it fits
  launch    print and run the deepspeed / torchrun / SLURM line for a config
  sweep     methods x latent budgets x seeds as nested MLflow runs, with a results table and plots
  compare   tracked runs side by side (differing params, metrics, speed), optionally as a plot

`simcot COMMAND --help` lists the options of a command with their defaults.
--debug (or SIMCOT_DEBUG=1): show the traceback of an error instead of its one line.
"""

# Failures a user can cause and fix (ConfigError, DataError, CheckpointError, CompareError are
# ValueErrors; a non-finite loss; a missing file): one line. Anything else is a bug: traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_ERROR = 2


def _help_requested(overrides: dict) -> bool:
    return bool(overrides.pop("help", False) or overrides.pop("h", False))


def _debug() -> bool:
    return os.environ.get("SIMCOT_DEBUG", "") not in ("", "0", "false", "False")


def _fail(e: Exception) -> None:
    """One line on stderr and exit 2 (called inside an except block: with --debug, re-raise)."""
    if _debug() and sys.exc_info()[1] is e:
        raise
    print(f"simcot: error: {e}", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


# --------------------------------------------------------------------------------------------
# Commands from their options: each command declares its options as one dataclass whose
# docstring is its usage line and description; --help and the parsing come from it.


def command_help(options: type, config_help: bool = False) -> str:
    extra = ["", "run config options (default):", *help_text(Config)] if config_help else []
    return "\n".join(options_help(options) + extra)


def _is_config_key(key: str) -> bool:
    """An option a run config may take (``--section.key``, ``--method``): one for the config to check."""
    return "." in key or key in {f.name for f in fields(Config)} or key in ALIASES


def command(options: type, *, run_config: bool = False, config_help: bool = False,
            defaults: Callable[[Any, dict], dict] | None = None):
    """A `simcot` command from its handler and its options dataclass. The handler gets the parsed
    options, and with `run_config` also the other ``--section.key`` options, which go to the run
    config; without it they are refused. `defaults(options, overrides)` may replace the dataclass's
    defaults (``plan`` reads them from the run config); options given on the command line win.
    Without any option, a command with a required one prints its help. Errors a user can fix
    (EXPECTED_ERRORS: a bad option, config, checkpoint or data) reach main, which prints them as one line."""
    def wrap(handler: Callable) -> Callable:
        name = handler.__name__

        def run(*args, **kw):
            if _help_requested(kw) or (not args and not kw and required_fields(options)):
                print(command_help(options, config_help))
                return
            on = _is_config_key if run_config else None
            opts, overrides = parse_options(options, args, kw, name, passes_on=on)
            if defaults:
                opts, _ = parse_options(options, args, kw, name, passes_on=on, defaults=defaults(opts, overrides))
            return handler(opts, overrides) if run_config else handler(opts)

        # fire reads the option names off the signature: with them, a bare `--no_ssh` is no_ssh=True
        # (not fire's `--noX` = X=False) and `--nodry_run` is dry_run=False, as on a plain function
        P = inspect.Parameter
        run.__signature__ = inspect.Signature([P("args", P.VAR_POSITIONAL),
                                               *(P(f.name, P.KEYWORD_ONLY, default=None) for f in fields(options)),
                                               P("kw", P.VAR_KEYWORD)])
        run.__name__, run.__doc__, run.options = name, inspect.cleandoc(options.__doc__), options
        return run
    return wrap


@dataclass
class TrainOptions:
    """simcot train [--config FILE.yaml] [--section.key VALUE ...]

    Train, evaluate on val and test, log everything to MLflow. Every run config key below is an
    option; a YAML file sets many at once and options given here override it."""

    config: str = opt("", "Run config (YAML), e.g. one of launchers/recipes")


@command(TrainOptions, run_config=True, config_help=True)
def train(o: TrainOptions, overrides: dict):
    from simcot.train.assemble import load_config  # here, not at the top: it imports torch and the models

    try:
        cfg = load_config(o.config or None, overrides)
    except (ConfigError, FileNotFoundError) as e:
        _fail(e)
    from simcot.parallel import is_distributed
    from simcot.train.engines.distributed import dist_env, fail_loudly, shutdown
    from simcot.train.data.formats import DataError
    from simcot.train.runner import run_training

    from simcot.train.loop import NonFiniteLossError

    try:
        summary = run_training(cfg, overrides)
    except (*EXPECTED_ERRORS, DataError, NonFiniteLossError) as e:
        if is_distributed():
            fail_loudly(dist_env().rank, e)
        _fail(e)
    except BaseException as e:
        if is_distributed():  # never wait in a collective for ranks that will not come
            fail_loudly(dist_env().rank, e)
        raise
    if dist_env().rank == 0:
        print(json.dumps(summary, indent=2))
    shutdown()


@dataclass
class EvalOptions:
    """simcot eval --checkpoint RUN_OR_CHECKPOINT [--out FILE] [--section.key VALUE ...]

    Evaluate a checkpoint (a checkpoint folder or a run folder) on a split. Any run config key
    overrides the checkpoint's own config, e.g. --eval.split val --eval.batch_size 64."""

    checkpoint: str = opt("", "Run folder or checkpoint folder", required=True)
    out: str = opt("", "Predictions JSONL path (default: beside the checkpoint)")


@command(EvalOptions, run_config=True, config_help=True)
def eval(o: EvalOptions, overrides: dict):  # noqa: A001 - the command's name
    from simcot.train.runner import run_evaluation

    print(json.dumps(run_evaluation(o.checkpoint, overrides, o.out), indent=2))


# `simcot data` reads a source as a run's data section does: these options are its fields
SourceOptions = fields_of(DataConfig, "source", "seed", "steps", "min_steps", "max_operand", "max_value", "digits",
                          "gsm8k_steps", "data_dir")


@dataclass
class DataOptions(SourceOptions):
    """simcot data [--source NAME] [--split] [--n] [--format] [--out] [options]

    Preview a data source, or write any source as jsonl, GSM8K-Aug text (aug) or iCoT text (icot).
    --source, --seed, --steps, --min_steps, --max_operand, --max_value, --digits, --gsm8k_steps and
    --data_dir are the run config's data.* keys: a generator previews the rows a run makes."""

    split: str = opt("train", "train | val | test")
    n: int = opt(0, "Rows (generators: how many to make, default 1000; files: a cap, 0 = all)")
    path: str = opt("", "Input file when --source is a file format (a run reads data.train_file and its siblings)")
    format: str = opt("preview", "preview | jsonl | aug | icot")
    out: str = opt("", "Output file (required unless previewing)")
    preview: int = opt(3, "Rows to print when previewing")


@command(DataOptions)
def data(o: DataOptions):
    from simcot.train.data.formats import DataError, write_records
    from simcot.train.data.sources import load_source

    source = DataConfig(**{f.name: getattr(o, f.name) for f in fields(SourceOptions)})
    records = load_source(source, o.split, o.n, o.path)
    if o.format == "preview":
        for r in records[:o.preview]:
            print(json.dumps(r, ensure_ascii=False))
        print(f"# {len(records)} rows from {o.source}:{o.split}", file=sys.stderr)
        return
    if not o.out:
        raise DataError("--out is required to write a file (or use --format preview)")
    count = write_records(records, o.out, o.format)
    print(f"wrote {count} rows to {o.out} ({o.format})", file=sys.stderr)


@dataclass
class DecodeOptions:
    """simcot decode --checkpoint RUN_OR_CHECKPOINT [--question TEXT | --data FILE | --split test] [--n 20]

    Decode a SIM-CoT model's latents into text with its step decoder, beside the gold steps. Other
    --section.key options override the checkpoint's config."""

    checkpoint: str = opt("", "A SIM-CoT run or checkpoint folder", required=True)
    question: str = opt("", "Decode the latents of this question (else rows of --data or --split)")
    split: str = opt("test", "train | val | test (when neither --question nor --data is given)")
    n: int = opt(20, "Rows of the file or split")
    out: str = opt("", "JSONL output (default: decoded_latents.jsonl in the checkpoint); also an MLflow artifact")
    data: str = opt("", "A data file in any format simcot reads (jsonl, gsm8k-jsonl, aug, icot, coconut)")


@command(DecodeOptions, run_config=True)
def decode(o: DecodeOptions, overrides: dict):
    from simcot.train.decode_latents import decode_latents, format_results

    print(format_results(decode_latents(o.checkpoint, o.question, o.split, o.n, overrides, o.out, o.data)))


@dataclass
class CompareOptions:
    """simcot compare [--experiment NAME | --runs ID,ID | --filter STR] [options]

    Tracked runs side by side: name, id, status, method, number of latents, the params that differ
    between the runs, final and best values of the headline metrics, wall time and tokens/s."""

    experiment: str = opt("", "Experiment name (default 'simcot' unless --filter is given)")
    runs: list[str] = opt([], "Comma-separated run ids (instead of --experiment/--filter)")
    filter: str = opt("", "MLflow search filter, e.g. \"params.train.lr = '0.001'\" or \"tags.method = 'cot'\" "
                      "(a sweep's children: \"tags.mlflow.parentRunId = 'ID'\")")
    tracking_uri: str = opt("", "Store; empty = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns.db")
    metric: list[str] = opt([], "Comma-separated headline metrics, each shown final and best with its step "
                            "(default val/accuracy)")
    params: list[str] = opt([], "Comma-separated params to show even where they do not differ")
    sort: str = opt("", "A column to sort by, '-column' for descending (default: oldest run first)")
    format: str = opt("table", "table | markdown | csv")
    plot: str = opt("", "Write a PNG: accuracy vs number of latents per method, and train/loss curves")
    split: str = opt("test", "Split of the accuracy in the plot")
    kind: str = opt("train", "train | eval | decode | all: training runs, or the runs of `simcot eval` (shown with "
                    "the training run they evaluated) / `simcot decode` on their checkpoints")


@command(CompareOptions)
def compare(o: CompareOptions):
    from simcot.train.tracking.compare import compare as run_compare

    sys.stdout.write(run_compare(o.experiment, o.runs, o.filter, o.tracking_uri, o.metric, o.params, o.sort, o.format,
                                 o.plot, o.split, o.kind))
    if o.plot:
        print(f"wrote {o.plot}", file=sys.stderr)


@dataclass
class ExportOptions:
    """simcot export --checkpoint RUN_OR_CHECKPOINT --out DIR [--dtype bf16|fp16|fp32]

    A consolidated safetensors Hugging Face model (ZeRO shards gathered, LoRA merged) that loads with
    from_pretrained, with its tokenizer; CODI's projection and the run config ride along so
    `simcot eval --checkpoint DIR` evaluates it as trained."""

    checkpoint: str = opt("", "Run folder or checkpoint folder", required=True)
    out: str = opt("", "Output folder", required=True)
    dtype: str = opt("bf16", "bf16 | fp16 | fp32")


@command(ExportOptions)
def export(o: ExportOptions):
    from simcot.train.export import export as run_export

    print(f"exported {o.checkpoint} -> {run_export(o.checkpoint, o.out, o.dtype)}")


@dataclass
class PlanOptions(PlanInputs):
    """simcot plan [--config FILE.yaml] [options] [--section.key VALUE ...]

    Per-GPU and per-node CPU memory of a run (DeepSpeed's estimators on a meta-device model, plus the
    latent rollout's activations), and whether it fits. With --config or --section.key options, the run
    config sets the model, ZeRO stage and offload, LoRA rank, micro-batch, sequence length (data.max_tokens
    when set), method and its latents, step decoder and checkpointing; the options below still override."""

    config: str = opt("", "Run config (YAML), read as `simcot train --config` reads it")
    json: bool = opt(False, "Machine-readable output")


def _plan_from_config(o: PlanOptions, overrides: dict) -> dict:
    if not (o.config or overrides):
        return {}
    from simcot.launchers.plan import plan_inputs
    from simcot.train.assemble import load_config

    return plan_inputs(load_config(o.config or None, overrides))


@command(PlanOptions, run_config=True, defaults=_plan_from_config)
def plan(o: PlanOptions, overrides: dict):
    from simcot.launchers.plan import make_plan

    p = make_plan(**{f.name: getattr(o, f.name) for f in fields(PlanInputs)})
    print(json.dumps(asdict(p), indent=2) if o.json else p.table())


@dataclass
class LaunchOptions:
    """simcot launch [--config FILE.yaml] [options] [--section.key VALUE ...]

    Print the launcher line for a training run, then run it (--dry_run only prints). Other
    --section.key options are passed on to `simcot train`."""

    config: str = opt("", "Run config (YAML) for `simcot train --config`")
    launcher: str = opt("deepspeed", "deepspeed | torchrun | slurm")
    gpus: int = opt(1, "Processes per node")
    nodes: int = opt(1, "Nodes")
    hostfile: str = opt("", 'DeepSpeed hostfile ("host slots=N" lines)')
    master_addr: str = opt("127.0.0.1", "Address of the rank-0 node")
    master_port: int = opt(29500, "Port on the rank-0 node")
    node_rank: int = opt(0, "This node's rank, with one launcher per node (--no_ssh, torchrun)")
    no_ssh: bool = opt(False, "One launcher per node without ssh (deepspeed --no_ssh)")
    dry_run: bool = opt(False, "Only print the line")


@command(LaunchOptions, run_config=True)
def launch(o: LaunchOptions, overrides: dict):
    from simcot.launchers.launch import launch as run_launch
    from simcot.train.assemble import load_config

    load_config(o.config or None, overrides)  # fail here, not on every node
    code = run_launch(**asdict(o), overrides=overrides)
    if code:
        raise SystemExit(code)


@dataclass
class SweepOptions:
    """simcot sweep [--config BASE.yaml] [options] [--section.key VALUE ...]

    Train and evaluate a grid of methods x latent budgets x seeds as nested MLflow runs under one
    parent, then write results.csv, results.md (test accuracy mean +- std) and plots to --out.
    Finished cells are skipped when the same command runs again. An empty --methods, --latents or
    --seeds takes the config's `grid:`. Other --section.key options apply to every cell (e.g.
    --data.steps 4 --model.name gpt2). The CPU grid of the README:
    simcot sweep --config launchers/recipes/sweep-toy.yaml"""

    config: str = opt("", "Base run config (YAML), optionally with a grid: section")
    methods: list[str] = opt([], "Methods (empty: the config's grid, else every method a sweep runs)")
    latents: list[int] = opt([], "Latent budgets L (Coconut: ceil(L/S) latents per step over S stages; empty: the "
                             "config's grid, else 1,2,4,8,16)")
    seeds: list[int] = opt([], "Seeds (empty: the config's grid, else 0,1,2)")
    stages: int = opt(0, "Coconut's curriculum stages S (0 = the task's step count: data.steps for arith, "
                      "data.digits for mult; else coconut.max_latent_stage)")
    out: str = opt("sweep", "Output folder (cells, runs, table, plots)")
    quick: bool = opt(False, "Fewer cells: latents 1,4 and seed 0")


@command(SweepOptions, run_config=True)
def sweep(o: SweepOptions, overrides: dict):
    from simcot.train.sweep import run_sweep

    latents, seeds = ([1, 4], [0]) if o.quick else (o.latents or None, o.seeds or None)
    summary = run_sweep(o.config, o.methods or None, latents, seeds, o.out, overrides, o.stages)
    print(open(summary["table"]).read())
    print(json.dumps(summary, indent=2))


COMMANDS = {"train": train, "eval": eval, "data": data, "decode": decode, "compare": compare, "export": export,
            "plan": plan, "launch": launch, "sweep": sweep}


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from LOCAL_RANK instead."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank"):
            skip = a == "--local_rank"
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    if any(a in ("--debug", "--debug=true", "--debug=True") for a in argv):
        os.environ["SIMCOT_DEBUG"] = "1"  # ranks started by `simcot launch` inherit it
        argv = [a for a in argv if a not in ("--debug", "--debug=true", "--debug=True")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        _fail(ValueError(f"unknown command '{argv[0]}'"))
    import fire

    try:
        fire.Fire(COMMANDS, command=argv, name="simcot")
    except EXPECTED_ERRORS as e:  # from a command: one line (train has its own, for the other ranks)
        _fail(e)
    except KeyboardInterrupt:
        if _debug():
            raise
        print("simcot: interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
