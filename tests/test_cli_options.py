"""Every `simcot` command's --help and parsing come from its options dataclass (issue 16), in process."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simcot.launchers import cli
from simcot.launchers.plan import PlanInputs, plan_inputs
from simcot.options import OptionError, cast, field_types, parse_options, shown
from simcot.train.config import Config, DataConfig, load_config

RECIPES = Path(__file__).resolve().parents[1] / "launchers" / "recipes"


def _main(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `simcot ARGV`."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_lists_every_option_with_its_default_and_doc(capsys, name):
    options = cli.COMMANDS[name].options
    code, out, err = _main(capsys, name, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: simcot {name}") and "options (default):" in out
    defaults = options()
    for key, f in _leaves(options):
        assert f.metadata.get("doc"), f"{options.__name__}.{key} has no doc"
        assert f"  --{key}={shown(getattr(defaults, key))}\n        {f.metadata['doc']}" in out, key


def test_every_run_config_option_has_a_doc_and_is_in_the_train_help(capsys):
    code, out, _ = _main(capsys, "train", "--help")
    assert code == 0
    for key, f in _leaves(Config):
        assert f.metadata.get("doc"), f"Config.{key} has no doc"
        assert f"  --{key}=" in out, key


@pytest.mark.parametrize("name", ["train", "eval"])
def test_train_and_eval_help_add_the_run_config(capsys, name):
    out = _main(capsys, name, "--help")[1]
    assert "\nrun config options (default):\n  --method='cot'\n" in out
    assert "--train.batch_size=64" in out and "--eval.split='test'" in out


def test_data_source_options_are_the_data_sections_own():
    data_fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    own = {f.name: f for f in dataclasses.fields(cli.DataOptions)}
    shared = own.keys() & data_fields.keys()
    assert shared == {"source", "seed", "steps", "min_steps", "max_operand", "max_value", "digits", "gsm8k_steps",
                      "data_dir"}
    for k in shared:
        assert own[k].metadata == data_fields[k].metadata and own[k].default == data_fields[k].default


def test_a_bad_value_is_one_line_naming_the_option_and_its_type(capsys):
    assert _main(capsys, "data", "--n", "abc") == (2, "", "simcot: error: --n: expected int, got 'abc'\n")
    assert _main(capsys, "data", "--n", "1.5") == (2, "", "simcot: error: --n: expected int, got 1.5\n")
    assert _main(capsys, "sweep", "--seeds", "0,x") == (
        2, "", "simcot: error: --seeds: expected comma-separated ints, got '0,x'\n")
    assert _main(capsys, "launch", "--dry_run", "maybe") == (
        2, "", "simcot: error: --dry_run: expected bool, got 'maybe'\n")


def test_debug_shows_the_error_itself(monkeypatch):
    monkeypatch.setenv("SIMCOT_DEBUG", "1")
    with pytest.raises(OptionError, match=r"^--n: expected int, got 'abc'$"):
        cli.main(["data", "--n", "abc"])
    with pytest.raises(ValueError, match=r"^unknown launcher 'x'"):  # from the command, past the parsing
        cli.main(["launch", "--launcher", "x", "--dry_run"])


def test_unknown_options_are_one_line_naming_them(capsys):
    assert _main(capsys, "data", "--x", "1", "--y", "2") == (
        2, "", "simcot: error: unknown option(s) for data: --x, --y\n")
    assert _main(capsys, "export", "--checkpoint", "c", "--out", "o", "--train.lr", "1") == (
        2, "", "simcot: error: unknown option(s) for export: --train.lr\n")
    # a command that passes options on to the run config refuses those no config can take ...
    assert _main(capsys, "plan", "--gpu", "8") == (2, "", "simcot: error: unknown option(s) for plan: --gpu\n")
    # ... and the config names its own unknown keys
    assert _main(capsys, "launch", "--dry_run", "--train.lrr", "1") == (
        2, "", "simcot: error: unknown config key 'train.lrr' (did you mean 'lr'?)\n")


def test_required_options(capsys):
    code, out, err = _main(capsys, "export")  # nothing given: the help
    assert code == 0 and out.startswith("usage: simcot export --checkpoint") and err == ""
    assert _main(capsys, "export", "--checkpoint", "c") == (2, "", "simcot: error: --out is required\n")
    assert _main(capsys, "decode", "--question", "1+1") == (2, "", "simcot: error: --checkpoint is required\n")


def test_bare_flags_as_on_a_plain_function(capsys):
    """fire knows the option names: a bare --no_ssh is True (not fire's --noX = X False), a bare
    --dry_run before another flag is True, and a positional argument fills the first option."""
    code, out, err = _main(capsys, "launch", "--dry_run", "--no_ssh", "--node_rank", "1", "--train.lr", "0.1")
    assert code == 0, err
    assert out.strip().endswith("--no_ssh --node_rank 1 --module simcot.launchers.cli train --train.lr=0.1")
    assert _main(capsys, "data", "mult", "--n", "1")[2] == "# 1 rows from mult:train\n"


def test_cast_and_parse():
    assert cast((1, 2), list[int]) == [1, 2] and cast("1, 2,", list[int]) == [1, 2] and cast(0, list[int]) == [0]
    assert cast(("a", "b"), list[str]) == ["a", "b"] and cast("", list[str]) == [] and cast("false", bool) is False
    assert cast(("a", "b"), str) == "a,b" and cast(3, str) == "3" and cast("4", float) == 4.0
    with pytest.raises(ValueError, match=r"^expected float, got 'x'$"):
        cast("x", float)
    opts, rest = parse_options(cli.EvalOptions, ("runs/a",), {"eval.split": "val"}, "eval",
                               passes_on=cli._is_config_key)
    assert opts == cli.EvalOptions(checkpoint="runs/a") and rest == {"eval.split": "val"}  # positional, as in a call
    with pytest.raises(OptionError, match=r"^option\(s\) for eval given twice: --checkpoint$"):
        parse_options(cli.EvalOptions, ("runs/a",), {"checkpoint": "runs/b"}, "eval")
    with pytest.raises(OptionError, match=r"^--sort needs a value \(one that starts with '-' is written "
                                          r"--sort=-VALUE\)$"):
        parse_options(cli.CompareOptions, (), {"sort": True, "wall_s": True}, "compare")  # `--sort -wall_s`


def test_plan_inputs_come_from_the_ds_config_the_run_builds():
    cfg = load_config(RECIPES / "semcot-llama-3.2-1b.yaml")
    got = plan_inputs(cfg)
    assert got == {"model": "llama-3.2-1b", "zero": 3, "offload": "none", "lora": 0, "micro_batch": 4,
                   "seq_len": 400, "n_latents": cfg.semcot.n_thoughts, "method": "semcot", "decoder": "copy",
                   "checkpointing": False}
    assert set(got) <= {f.name for f in dataclasses.fields(PlanInputs)}
    off = load_config(None, {"deepspeed.config": "zero3_offload", "model.gradient_checkpointing": True})
    assert plan_inputs(off) == {"model": "tiny-llama", "zero": 3, "offload": "all", "lora": 0, "micro_batch": 32,
                                "n_latents": 0, "method": "cot", "decoder": "copy", "checkpointing": True}
    opt_only = load_config(None, {"deepspeed.zero_stage": 2, "deepspeed.offload_optimizer": "cpu"})
    assert plan_inputs(opt_only)["offload"] == "optimizer"


def test_plan_with_a_recipe_equals_plan_with_the_same_flags(capsys):
    recipe = str(RECIPES / "simcot-coconut-llama-3.2-1b.yaml")
    flags = ["--model", "llama-3.2-1b", "--zero", "2", "--offload", "none", "--lora", "0", "--micro_batch", "8",
             "--seq_len", "200", "--n_latents", "10", "--method", "simcot-coconut", "--decoder", "copy",
             "--checkpointing", "False", "--gpus", "4"]
    runs = {}
    for name, argv in {"config": ["--config", recipe, "--gpus", "4"], "flags": flags,
                       "config+flag": ["--config", recipe, "--gpus", "4", "--zero", "3"],
                       "flags+flag": flags + ["--zero", "3"]}.items():
        code, out, err = _main(capsys, "plan", *argv, "--json")
        assert code == 0, err
        runs[name] = json.loads(out)
    assert runs["config"] == runs["flags"] and runs["config"]["zero"] == 2 and runs["config"]["gpus"] == 4
    assert runs["config+flag"] == runs["flags+flag"] and runs["config+flag"]["zero"] == 3  # a flag wins
    out = _main(capsys, "plan", "--json")[1]
    default = json.loads(out)  # no config: the planner's own defaults
    assert default["model"] == "llama-3.1-8b" and default["gpus"] == 8 and default["zero"] == 3


def test_plan_json_is_the_whole_of_stdout_in_a_fresh_process(tmp_path):
    """DeepSpeed logs its accelerator detection to stdout when first imported: `simcot plan --json`
    keeps that on stderr, so its stdout parses as JSON (`| jq`)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    p = subprocess.run([sys.executable, "-m", "simcot.launchers.cli", "plan", "--model", "tiny-llama", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["model"] == "tiny-llama"
