"""The from_pretrained path, with a tiny model and tokenizer saved to a folder (no hub)."""

import io
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaTokenizer

from simcot.train.data.generators import arith_chain
from simcot.train.runner import build, load_checkpoint_model, run_training
from simcot.train.data.tokenizer import SPECIAL_TOKENS


def _pretrained_dir(tmp_path: Path) -> Path:
    """A 'pretrained' GPT-2-style model and a tokenizer that knows nothing of simcot's tokens."""
    texts = [t for r in arith_chain(300, 2, seed=5) for t in (r["question"], *r["steps"], "### " + r["answer"], "<<")]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=300, byte_fallback=True,
                                   split_digits=True, user_defined_symbols=["\n", "<<"], hard_vocab_limit=False,
                                   normalization_rule_name="identity", add_dummy_prefix=False, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, minloglevel=2)
    raw = tmp_path / "sp"
    raw.mkdir()
    (raw / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(raw), pad_token="<pad>", add_prefix_space=False)
    out = tmp_path / "tiny-pretrained"
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                                        bos_token_id=2, eos_token_id=3))
    model.save_pretrained(str(out))
    return out


def test_a_pretrained_folder_trains_with_special_tokens_added(tiny, tmp_path):
    src = _pretrained_dir(tmp_path)
    original = AutoModelForCausalLM.from_pretrained(str(src))
    n_old = original.get_input_embeddings().num_embeddings
    cfg, _ = tiny(method="coconut", **{"model.name": str(src), "coconut.max_latent_stage": 1, "train.epochs": 2,
                                       "train.run_name": "pre"})
    built = build(cfg, tmp_path / "probe")
    emb = built.model.lm.get_input_embeddings().weight
    assert emb.shape[0] == n_old + 3 and all(t in built.tok.get_vocab() for t in SPECIAL_TOKENS)
    assert torch.equal(emb[:n_old], original.get_input_embeddings().weight)  # pretrained rows untouched
    ltok = built.tok.convert_tokens_to_ids("<<")
    assert all(torch.equal(emb[built.tok.convert_tokens_to_ids(t)], emb[ltok]) for t in SPECIAL_TOKENS)  # copy '<<'
    summary = run_training(cfg)
    assert summary["steps"] == 8
    cfg2, loaded, _ = load_checkpoint_model(summary["checkpoint"])
    assert loaded.model.lm.get_input_embeddings().num_embeddings == n_old + 3
    assert loaded.tok.convert_tokens_to_ids(SPECIAL_TOKENS[0]) == built.tok.convert_tokens_to_ids(SPECIAL_TOKENS[0])


def test_a_pretrained_folder_missing_a_tensor_is_refused_by_name(tiny, tmp_path):
    import pytest
    from safetensors.torch import load_file, save_file

    src = _pretrained_dir(tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    dropped = "transformer.h.1.mlp.c_fc.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    cfg, _ = tiny(**{"model.name": str(src)})
    with pytest.raises(ValueError, match=rf"the weights do not fit the model \(missing .*{dropped}"):
        build(cfg, tmp_path / "probe")


def test_copy_decoder_from_the_pretrained_base_or_from_the_init_from_run(tiny, tmp_path):
    """SIM-CoT's references start the copy decoder from the pretrained base while the main model
    starts from the CoT (or Coconut) run: copy_from=pretrained does that, init copies the run."""
    import pytest
    from safetensors.torch import load_file

    from simcot.train.assemble import load_config
    from simcot.train.config import ConfigError

    src = _pretrained_dir(tmp_path)
    cot, _ = tiny(**{"model.name": str(src), "train.epochs": 1, "train.run_name": "cot-pre"})
    ckpt = run_training(cot)["checkpoint"]
    pretrained = AutoModelForCausalLM.from_pretrained(str(src)).state_dict()
    key = "transformer.h.0.mlp.c_fc.weight"
    for copy_from in ("pretrained", "init"):
        cfg, _ = tiny(method="simcot-coconut", **{"model.name": str(src), "train.init_from": ckpt,
                                                  "simcot.decoder": "copy", "simcot.copy_from": copy_from})
        built = build(cfg, tmp_path / f"probe-{copy_from}", init_from=Path(ckpt))
        dec, main = built.model.step_decoder.lm.state_dict(), built.model.lm.state_dict()
        assert not torch.equal(main[key], pretrained[key])  # the main model starts from the CoT run
        assert torch.equal(dec[key], pretrained[key] if copy_from == "pretrained" else main[key]), copy_from
        assert dec["transformer.wte.weight"].shape == main["transformer.wte.weight"].shape  # resized alike
    # resuming or evaluating a run: the checkpoint overwrites the decoder, so the base is not loaded again
    import simcot.models.loading as loading

    cfg, _ = tiny(method="simcot-coconut", **{"model.name": str(src), "train.init_from": ckpt, "train.epochs": 1,
                                              "simcot.decoder": "copy", "simcot.copy_from": "pretrained",
                                              "train.run_name": "sim-pre"})
    run_ckpt = run_training(cfg)["checkpoint"]
    real_build_lm, calls = loading.build_lm, []
    loading.build_lm = lambda *a, **k: calls.append(1) or real_build_lm(*a, **k)
    try:
        _, loaded, _ = load_checkpoint_model(run_ckpt, inference=False)
    finally:
        loading.build_lm = real_build_lm
    assert calls == []  # the runner's own build_lm (imported by name) builds the main model; nothing else
    saved = load_file(str(Path(run_ckpt) / "model.safetensors"))
    assert torch.equal(loaded.model.step_decoder.lm.state_dict()[key], saved[f"step_decoder.lm.{key}"])
    with pytest.raises(ConfigError, match="simcot.copy_from=pretrained needs pretrained weights, but model "
                                          "'tiny-llama' is randomly initialised"):
        load_config(None, {"method": "simcot-codi", "simcot.copy_from": "pretrained"})


def test_an_unknown_model_name_fails_fast_before_any_data_with_a_suggestion(tiny, tmp_path, monkeypatch):
    """Issue 15 (6): 'tiny-llamaa' went to the hub (a minute of retries offline), then an OSError."""
    import pytest

    import simcot.train.assemble as assemble
    from simcot.train.config import ConfigError

    monkeypatch.setattr(assemble, "load_splits", lambda *a, **k: pytest.fail("data generated before the check"))
    cfg, _ = tiny(**{"model.name": "tiny-llamaa"})
    with pytest.raises(ConfigError, match=r"^model.name 'tiny-llamaa' is not a preset, a local folder or a reachable "
                                          r"hub id \(did you mean 'tiny-llama'\?\)$"):
        run_training(cfg)
    assert not (tmp_path / "runs" / "t").exists()
    cfg, _ = tiny(**{"model.name": "no-such-org/no-such-model"})  # offline in tests: not in the cache either
    with pytest.raises(ConfigError, match="'no-such-org/no-such-model' is not a preset, a local folder or a "
                                          "reachable hub id"):
        run_training(cfg)
    (tmp_path / "empty").mkdir()
    cfg, _ = tiny(**{"model.name": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="the folder has no config.json"):
        run_training(cfg)


def test_a_truncated_safetensors_file_or_a_damaged_tokenizer_is_named(tiny, tmp_path):
    """Issue 15 (7): both were raw library tracebacks that named no file."""
    import pytest

    src = _pretrained_dir(tmp_path)
    weights = src / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) - 100])
    cfg, _ = tiny(**{"model.name": str(src)})
    with pytest.raises(ValueError, match=rf"^{weights}: damaged safetensors file"):
        build(cfg, tmp_path / "probe")
    with pytest.raises(ValueError, match=rf"^{weights}: damaged safetensors file"):
        run_training(cfg)  # checked with the name, before any data
    weights.write_bytes(good)
    tok_file = src / "tokenizer.json"
    assert tok_file.is_file()
    tok_file.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')  # cut short
    with pytest.raises(ValueError, match=rf"^{src} \(.*tokenizer.json.*\): cannot load the tokenizer: "):
        build(cfg, tmp_path / "probe")
