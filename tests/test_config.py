"""Typed config: YAML + overrides, strict keys, coercion, help text from field docs."""

import pytest

from simcot.train.config import Config, ConfigError, help_text, load_config


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: nocot\ntrain:\n  lr: 0.001\n  epochs: 3\nmodel:\n  name: tiny-gpt2\n")
    cfg = load_config(p, {"train.lr": "2e-4", "data.steps": 5})
    assert (cfg.method, cfg.train.lr, cfg.train.epochs, cfg.model.name, cfg.data.steps) == \
        ("nocot", 2e-4, 3, "tiny-gpt2", 5)


def test_tracking_uri_has_its_flat_alias():
    assert load_config(None, {"tracking_uri": "sqlite:///x.db"}).tracking.uri == "sqlite:///x.db"
    assert load_config(None, {"tracking-uri": "http://h:5000"}).tracking.uri == "http://h:5000"


def test_unknown_key_is_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.lrr' \(did you mean 'lr'\?\)$"):
        load_config(None, {"train.lrr": 1})
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  sauce: gsm8k\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'data.sauce' \(did you mean 'source'\?\)$"):
        load_config(p)


def test_bad_types_and_choices_name_the_key():
    with pytest.raises(ConfigError, match=r"config key 'train.epochs': expected int, got 'many'"):
        load_config(None, {"train.epochs": "many"})
    from simcot.train.assemble import load_config as load_and_check_method  # the method registry checks names

    with pytest.raises(ConfigError, match=r"config key 'method': unknown method 'magic'"):
        load_and_check_method(None, {"method": "magic"})
    with pytest.raises(ConfigError, match=r"config key 'train.precision': 'fp8' is not one of fp32, bf16, fp16"):
        load_config(None, {"train.precision": "fp8"})
    with pytest.raises(ConfigError, match=r"train.batch_size \(10\) must be a multiple of train.micro_batch_size \(4\)"):
        load_config(None, {"train.batch_size": 10, "train.micro_batch_size": 4})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_help_lists_every_field_with_default_and_doc():
    text = "\n".join(help_text(Config))
    assert "--train.lr=0.003" in text and "Peak learning rate" in text
    assert "--data.source='arith'" in text and "--model.name='tiny-llama'" in text


def test_compiled_decoding_is_refused_under_zero3():
    with pytest.raises(ConfigError, match=r"^eval.compile does not run under deepspeed.zero_stage=3 \(its parameters "
                                          r"are gathered by hooks inside every forward\); drop --eval.compile$"):
        load_config(None, {"eval.compile": True, "deepspeed.zero_stage": 3})
    assert load_config(None, {"eval.compile": True, "deepspeed.zero_stage": 2}).eval.compile
