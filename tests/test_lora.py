"""LoRA through peft: only the adapter (and the method's extras) train; checkpoints round-trip;
export merges the adapter into plain weights that evaluate the same."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simcot.train.evaluate import evaluate
from simcot.train.export import export
from simcot.train.runner import build, load_checkpoint_model, run_training

pytest.importorskip("peft")


@pytest.mark.parametrize("method", ["cot", "codi"])
def test_lora_trains_the_adapter_only_and_exports_merged(tiny, tmp_path, method):
    cfg, _ = tiny(method=method, **{"model.lora_r": 4, "model.lora_alpha": 8, "model.lora_dropout": 0.0,
                                    "codi.n_latents": 2, "train.epochs": 2, "train.run_name": f"lora-{method}"})
    start = build(cfg, tmp_path / "probe").model.state_dict()  # same seed: the run's initial weights
    summary = run_training(cfg)
    ckpt = Path(summary["checkpoint"])
    trained = load_file(str(ckpt / "model.safetensors"))
    changed = {k for k, v in trained.items() if k in start and not torch.equal(v, start[k])}
    assert changed and all("lora_" in k or k.startswith("projection.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("projection.") for k in changed) == (method == "codi")

    cfg_c, ref, dev = load_checkpoint_model(ckpt)
    out = export(ckpt, tmp_path / "merged", dtype="fp32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in merged.state_dict())
    cfg_e, exp, _ = load_checkpoint_model(out)
    kw = dict(ecfg=cfg_c.eval, answer_prefix=cfg_c.data.answer_prefix, split="test", device=dev, epoch=1)
    a = evaluate(ref.model, ref.method, ref.examples["test"], ref.tok, **kw)
    b = evaluate(exp.model, exp.method, exp.examples["test"], exp.tok, **kw)
    assert [p["generated"] for p in a.predictions] == [p["generated"] for p in b.predictions]


def test_an_export_whose_files_lose_or_change_a_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPT2Config

    from simcot.train.export import verify_reload

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    lm.save_pretrained(str(tmp_path))
    verify_reload(tmp_path, lm, torch.float32)  # the untouched folder passes
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = "transformer.h.0.mlp.c_proj.weight"
    save_file({**weights, key: weights[key] + 1e-3}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"reloads with other values in {key}"):
        verify_reload(tmp_path, lm, torch.float32)
    save_file({k: v for k, v in weights.items() if k != key}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"the weights do not fit the model \\(missing {key}\\)"):
        verify_reload(tmp_path, lm, torch.float32)
