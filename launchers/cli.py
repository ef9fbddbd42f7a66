"""The ``simcot`` command line (python-fire).

    simcot train [--config FILE.yaml] [--section.key VALUE ...]
    simcot eval --checkpoint RUN_OR_CHECKPOINT [--eval.split test] [--section.key VALUE ...]
    simcot data --source arith|mult|gsm8k|prosqa|<format> [--split] [--n] [--format] [--out]
    simcot compare [--experiment NAME | --runs ID,ID | --filter STR] [--format] [--sort] [--metric] [--plot]

Options are the fields of the config dataclasses (``simcot train --help`` lists them all with
their defaults); a YAML file sets many at once and command-line flags override it.

Every expected failure (bad config or data, a missing or damaged checkpoint, an unknown model, a
non-finite loss) is one line on stderr, ``simcot: error: ...``, and a non-zero exit; ``--debug``
(any command) or ``SIMCOT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys

from simcot.train.config import Config, ConfigError, help_text

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


def _config_help(command: str, extra: str = "") -> str:
    head = f"usage: simcot {command} [--config FILE.yaml] [--section.key VALUE ...]\n{extra}\noptions (default):"
    return "\n".join([head, *help_text(Config)])


def _debug() -> bool:
    return os.environ.get("SIMCOT_DEBUG", "") not in ("", "0", "false", "False")


def _fail(e: Exception) -> None:
    """One line on stderr and exit 2 (called inside an except block: with --debug, re-raise)."""
    if _debug() and sys.exc_info()[1] is e:
        raise
    print(f"simcot: error: {e}", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


def train(config: str = "", **overrides):
    """Train a model; every config field is an option (see --help)."""
    if _help_requested(overrides):
        print(_config_help("train", "Train, evaluate on val and test, log everything to MLflow."))
        return
    from simcot.train.assemble import load_config  # here, not at the top: it imports torch and the models

    try:
        cfg = load_config(config or None, overrides)
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


def eval(checkpoint: str = "", out: str = "", **overrides):  # noqa: A001 - the command's name
    """Evaluate a checkpoint (a checkpoint folder or a run folder) on a split."""
    if _help_requested(overrides) or not checkpoint:
        extra = ("  --checkpoint  run folder or checkpoint folder (required)\n"
                 "  --out         predictions JSONL path (default: beside the checkpoint)\n"
                 "  Any config key overrides the checkpoint's own config, e.g. --eval.split val --eval.batch_size 64")
        print(_config_help("eval --checkpoint PATH", extra))
        if not checkpoint and not overrides:
            return
        if not checkpoint:
            _fail(ValueError("--checkpoint is required"))
    from simcot.train.runner import run_evaluation

    try:
        print(json.dumps(run_evaluation(checkpoint, overrides, out), indent=2))
    except EXPECTED_ERRORS as e:
        _fail(e)


DATA_HELP = """usage: simcot data [options]

Preview a data source, or write any source as jsonl, GSM8K-Aug text (aug) or iCoT text (icot).

options (default):
  --source='arith'     arith | mult (generated); gsm8k | gsm8k-aug | gsm8k-aug-nl | multiarith | svamp
                       (local copy, else the Hugging Face Hub) | prosqa | prontoqa; or a file format
                       jsonl | gsm8k-jsonl | aug | icot | coconut | semcot (with --path)
  --split='train'      train | val | test
  --n=0                rows (generators: how many to make, default 1000; files: a cap, 0 = all)
  --seed=0             generator seed
  --steps=3            arith: operations per problem
  --digits=4           mult: digits per factor (2..6)
  --gsm8k_steps='equations'  gsm8k: equations (<<expr>> annotations) or text (solution lines)
  --path=''            input file for a file format
  --data_dir=''        local data folder, searched before $SIMCOT_DATA_DIR and ../shared/data
  --format='preview'   preview | jsonl | aug | icot
  --out=''             output file (required unless previewing)
  --preview=3          rows to print when previewing
"""


def data(source: str = "arith", split: str = "train", n: int = 0, seed: int = 0, steps: int = 3, digits: int = 4,
         gsm8k_steps: str = "equations", path: str = "", data_dir: str = "", format: str = "preview",  # noqa: A002
         out: str = "", preview: int = 3, **extra):
    """Preview or convert a data source (see --help)."""
    if _help_requested(extra):
        print(DATA_HELP)
        return
    if extra:
        _fail(ValueError(f"unknown option(s) for data: {', '.join('--' + k for k in extra)}"))
    from simcot.train.data.formats import DataError, write_records
    from simcot.train.data.sources import load_source

    try:
        records = load_source(str(source), str(split), n=int(n), seed=int(seed), steps=int(steps),
                              digits=int(digits), data_dir_=str(data_dir), gsm8k_steps=str(gsm8k_steps),
                              path=str(path))
        if format == "preview":
            for r in records[:preview]:
                print(json.dumps(r, ensure_ascii=False))
            print(f"# {len(records)} rows from {source}:{split}", file=sys.stderr)
            return
        if not out:
            raise DataError("--out is required to write a file (or use --format preview)")
        count = write_records(records, out, str(format))
    except (DataError, ValueError) as e:
        _fail(e)
    print(f"wrote {count} rows to {out} ({format})", file=sys.stderr)


DECODE_HELP = """usage: simcot decode --checkpoint RUN_OR_CHECKPOINT [--question TEXT | --data FILE | --split test] [--n 20]

Decode a SIM-CoT model's latents into text with its step decoder, beside the gold steps.

options (default):
  --checkpoint=''   a SIM-CoT run or checkpoint folder (required)
  --question=''     decode the latents of this question (else rows of --split)
  --data=''         a data file in any format simcot reads (jsonl, gsm8k-jsonl, aug, icot, coconut)
  --split='test'    train | val | test (when neither --question nor --data is given)
  --n=20            rows of the file or split
  --out=''          JSONL output (default: decoded_latents.jsonl in the checkpoint); also an MLflow artifact
"""


def decode(checkpoint: str = "", question: str = "", split: str = "test", n: int = 20, out: str = "", data: str = "",
           **overrides):
    """Decode latents to text with the SIM-CoT step decoder (see --help)."""
    if _help_requested(overrides) or not checkpoint:
        print(DECODE_HELP)
        if not checkpoint and overrides:
            _fail(ValueError("--checkpoint is required"))
        return
    from simcot.train.decode_latents import decode_latents, format_results

    try:
        results = decode_latents(checkpoint, str(question), str(split), int(n), overrides, out, str(data))
    except EXPECTED_ERRORS as e:
        _fail(e)
    print(format_results(results))




COMPARE_HELP = """usage: simcot compare [options]

Tracked runs side by side: name, id, status, method, number of latents, the params that differ
between the runs, final and best values of the headline metrics, wall time and tokens/s.

options (default):
  --experiment=''    experiment name (default 'simcot' unless --filter is given)
  --runs=''          comma-separated run ids (instead of --experiment/--filter)
  --kind='train'     train | eval | decode | all: training runs, or the runs of `simcot eval` (shown
                     with the training run they evaluated) / `simcot decode` on their checkpoints
  --filter=''        MLflow search filter, e.g. "params.train.lr = '0.001'" or "tags.method = 'cot'"
                     (a sweep's children: "tags.mlflow.parentRunId = 'ID'")
  --tracking_uri=''  store; empty = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns.db
  --metric=''        comma-separated headline metrics, each shown final and best with its step
                     (default val/accuracy)
  --params=''        comma-separated params to show even where they do not differ
  --sort=''          a column to sort by, '-column' for descending (default: oldest run first)
  --format='table'   table | markdown | csv
  --plot=''          write a PNG: accuracy vs number of latents per method, and train/loss curves
  --split='test'     split of the accuracy in the plot
"""


def _names(value) -> list[str]:
    """A comma-separated option; fire hands over "a,b" as a tuple."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def compare(experiment: str = "", runs="", filter: str = "", tracking_uri: str = "", metric="",  # noqa: A002
            params="", sort: str = "", format: str = "table", plot: str = "", split: str = "test",  # noqa: A002
            kind: str = "train", **extra):
    """Compare tracked runs (see --help)."""
    if _help_requested(extra):
        print(COMPARE_HELP)
        return
    if sort is True:  # `--sort -col`: fire reads -col as a flag
        _fail(ValueError("--sort needs a column; for descending order write --sort=-COLUMN"))
    if extra:
        _fail(ValueError(f"unknown option(s) for compare: {', '.join('--' + k for k in extra)}"))
    from simcot.train.tracking.compare import CompareError
    from simcot.train.tracking.compare import compare as run_compare

    try:
        out = run_compare(str(experiment), _names(runs), str(filter), str(tracking_uri), _names(metric),
                          _names(params), str(sort), str(format), str(plot), str(split), str(kind))
    except CompareError as e:
        _fail(e)
    sys.stdout.write(out)
    if plot:
        print(f"wrote {plot}", file=sys.stderr)


def export(checkpoint: str = "", out: str = "", dtype: str = "bf16", **extra):
    """Write a checkpoint as a Hugging Face model folder (see --help)."""
    if _help_requested(extra) or not checkpoint or not out:
        print("usage: simcot export --checkpoint RUN_OR_CHECKPOINT --out DIR [--dtype bf16|fp16|fp32]\n\n"
              "A consolidated safetensors Hugging Face model (ZeRO shards gathered, LoRA merged) that loads with\n"
              "from_pretrained, with its tokenizer; CODI's projection and the run config ride along so\n"
              "`simcot eval --checkpoint DIR` evaluates it as trained.")
        if (checkpoint or out) and not (checkpoint and out):
            _fail(ValueError("--checkpoint and --out are both required"))
        return
    if extra:
        _fail(ValueError(f"unknown option(s) for export: {', '.join('--' + k for k in extra)}"))
    from simcot.train.export import export as run_export

    try:
        path = run_export(checkpoint, out, str(dtype))
    except EXPECTED_ERRORS as e:
        _fail(e)
    print(f"exported {checkpoint} -> {path}")


PLAN_HELP = """usage: simcot plan [options]

Per-GPU and per-node CPU memory of a run (DeepSpeed's estimators on a meta-device model, plus the
latent rollout's activations), and whether it fits.

options (default):
  --model='llama-3.1-8b'  preset or HF path/name (only its config is read)
  --gpus=8 --nodes=1      GPUs per node, nodes
  --zero=3                ZeRO stage 0..3
  --offload='none'        none | optimizer | all (optimizer + parameters, ZeRO-3)
  --lora=0                LoRA rank (0 = full fine-tuning)
  --micro_batch=4 --seq_len=256 --n_latents=6
  --method='codi'         the objective (CODI adds a teacher pass, SIM-CoT a decoder)
  --decoder='copy'        SIM-CoT step decoder: copy doubles the model states
  --gpu_memory=80         GiB per GPU
  --checkpointing=False   activation checkpointing
  --json=False            machine-readable output
"""


def plan(**kw):
    """Memory plan for a run (see --help)."""
    if _help_requested(kw):
        print(PLAN_HELP)
        return
    from simcot.launchers.plan import make_plan, plan_command

    allowed = set(make_plan.__code__.co_varnames[:make_plan.__code__.co_argcount]) | {"json"}
    unknown = set(kw) - allowed
    if unknown:
        _fail(ValueError(f"unknown option(s) for plan: {', '.join('--' + k for k in sorted(unknown))}"))
    try:
        print(plan_command(**kw))
    except ValueError as e:
        _fail(e)


LAUNCH_HELP = """usage: simcot launch [--config FILE.yaml] [options] [--section.key VALUE ...]

Print the launcher line for a training run, then run it (--dry_run only prints).

options (default):
  --launcher='deepspeed'  deepspeed | torchrun | slurm
  --gpus=1 --nodes=1      processes per node, nodes
  --hostfile=''           DeepSpeed hostfile ("host slots=N" lines)
  --master_addr='127.0.0.1' --master_port=29500
  --node_rank=0 --no_ssh=False   one launcher per node without ssh (deepspeed --no_ssh, torchrun)
  --dry_run=False
Other --section.key options are passed on to `simcot train`.
"""


def launch(config: str = "", launcher: str = "deepspeed", gpus: int = 1, nodes: int = 1, hostfile: str = "",
           master_addr: str = "127.0.0.1", master_port: int = 29500, node_rank: int = 0, no_ssh: bool = False,
           dry_run: bool = False, **overrides):
    """Print and run the launcher line (see --help)."""
    if _help_requested(overrides):
        print(LAUNCH_HELP)
        return
    from simcot.launchers.launch import launch as run_launch
    from simcot.train.assemble import load_config

    try:
        load_config(config or None, overrides)  # fail here, not on every node
        code = run_launch(dry_run=bool(dry_run), config=config, launcher=launcher, gpus=int(gpus), nodes=int(nodes),
                          hostfile=hostfile, master_addr=master_addr, master_port=int(master_port),
                          node_rank=int(node_rank), no_ssh=bool(no_ssh), overrides=overrides)
    except (ConfigError, ValueError) as e:
        _fail(e)
    if code:
        raise SystemExit(code)


SWEEP_HELP = """usage: simcot sweep [--config BASE.yaml] [options] [--section.key VALUE ...]

Train and evaluate a grid of methods x latent budgets x seeds as nested MLflow runs under one
parent, then write results.csv, results.md (test accuracy mean +- std) and plots to --out.
Finished cells are skipped when the same command runs again.

options (default: the config's `grid:` when it has one, else the values below):
  --methods='nocot,cot,coconut,simcot-coconut,codi,simcot-codi'
  --latents='1,2,4,8,16'   latent budgets L (Coconut: ceil(L/S) latents per step over S stages)
  --seeds='0,1,2'
  --stages=0               Coconut's curriculum stages S (0 = the task's step count: data.steps for
                           arith, data.digits for mult; else coconut.max_latent_stage)
  --out='sweep'            output folder (cells, runs, table, plots)
  --quick=False            fewer cells: latents 1,4 and seed 0
Other --section.key options apply to every cell (e.g. --data.steps 4 --model.name gpt2).
The CPU grid of the README: simcot sweep --config launchers/recipes/sweep-toy.yaml
"""


def sweep(config: str = "", methods="", latents="", seeds="", out: str = "sweep",
          quick: bool = False, stages: int = 0, **overrides):
    """Run a methods x latents x seeds grid (see --help)."""
    if _help_requested(overrides):
        print(SWEEP_HELP)
        return
    from simcot.train.sweep import run_sweep

    try:
        ints = lambda v: [int(x) for x in _names(v)]  # noqa: E731
        # empty: the config's grid, else run_sweep's defaults
        lat, sd = ([1, 4], [0]) if quick else (ints(latents) or None, ints(seeds) or None)
        summary = run_sweep(config, _names(methods) or None, lat, sd, str(out), overrides, int(stages))
    except (ConfigError, ValueError) as e:
        _fail(e)
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
    except EXPECTED_ERRORS as e:  # raised where a command has no handler of its own
        _fail(e)
    except KeyboardInterrupt:
        if _debug():
            raise
        print("simcot: interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
