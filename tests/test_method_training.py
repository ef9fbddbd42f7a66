"""Every method trains (the loss falls when overfitting), gradients reach every latent part, a
checkpoint round-trips, and a SIM-CoT model evaluates identically without its step decoder."""

import json
import random
from pathlib import Path

import pytest
import torch

from simcot.models.rollout import run_latents
from simcot.train.decode_latents import decode_latents, format_results
from simcot.train.evaluate import evaluate
from simcot.train.engines.checkpoint import load_weights
from simcot.train.runner import build, load_checkpoint_model, run_training
from simcot.train.methods.step_supervision import decoder_loss

LATENT = {"coconut.c_thought": 1, "coconut.max_latent_stage": 2, "coconut.epochs_per_stage": 1,
          "codi.n_latents": 2}
METHODS = ["cot", "nocot", "coconut", "codi", "simcot-coconut", "simcot-codi"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_finite_and_falls_when_overfitting(tiny, name):
    # Coconut methods train at their final stage throughout, so every step has the same objective
    cfg, _ = tiny(method=name, **LATENT, **{"coconut.stage_offset": 3,"data.n_train": 16, "train.epochs": 25, "train.lr": 1e-2,
                                            "train.schedule": "constant", "data.n_val": 0, "data.n_test": 0,
                                            "simcot.decoder": "small", "simcot.small_layers": 1})
    losses = _losses(run_training(cfg)["run_dir"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name, decoder", [("coconut", ""), ("codi", ""), ("simcot-coconut", "copy"),
                                           ("simcot-coconut", "shared"), ("simcot-codi", "small"),
                                           ("simcot-codi", "shared")])
def test_gradients_reach_the_latent_path_projection_and_decoder(tiny, tmp_path, name, decoder):
    cfg, _ = tiny(method=name, **LATENT, **({"simcot.decoder": decoder} if decoder else {}))
    b = build(cfg, tmp_path)
    batch = b.method.collate(b.examples["train"][:4], 5, random.Random(0))
    b.model.zero_grad()
    b.model(b.method.loss, batch).loss.backward()
    grads = {n: p.grad for n, p in b.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("lm.") for n in grads)
    if "codi" in name:
        assert {n for n in grads if n.startswith("projection.")} == {n for n, _ in b.model.named_parameters()
                                                                      if n.startswith("projection.")}
    if name.startswith("simcot"):
        dec = [n for n, _ in b.model.named_parameters() if n.startswith("step_decoder.")]
        assert dec and any(n in grads for n in dec)
        if decoder == "shared":  # the adapter's B starts at zero, so only the B matrices get gradient at step 0
            assert all(n in grads for n in dec if n.endswith(".b.weight"))


@pytest.mark.parametrize("decoder", ["shared", "copy"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny, tmp_path, decoder):
    """The recompute in backward must run as the forward did: the shared decoder's adapter is on
    only inside decoder passes, so its recompute has to switch it on again."""
    grads = []
    for ckpt in (False, True):
        cfg, _ = tiny(method="simcot-codi", **LATENT, **{"simcot.decoder": decoder,
                                                         "model.gradient_checkpointing": ckpt})
        b = build(cfg, tmp_path / str(ckpt))
        batch = b.method.collate(b.examples["train"][:4], 0, random.Random(0))
        with torch.no_grad():  # B starts at zero: give the adapter an effect worth recomputing
            for n, p in b.model.named_parameters():
                if n.endswith(".b.weight"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        loss = b.model(b.method.loss, batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in b.model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_batched_decoder_loss_equals_a_per_slot_loop(tiny, tmp_path, norm):
    cfg, _ = tiny(method="simcot-coconut", **LATENT, **{"simcot.normalization": norm})
    b = build(cfg, tmp_path)
    torch.set_default_dtype(torch.float64)
    try:
        b.model.double()
        batch = b.method.collate(b.examples["train"][:5], 6, random.Random(0))
        ro = run_latents(b.model, batch["prefix_ids"], batch["prefix_mask"], batch["n_latents"], batch["max_latents"])
        got = decoder_loss(b.model, ro.latents, batch, norm)
        dec, lm = b.model.step_decoder, b.model.lm
        per_slot = {}
        for r in range(batch["dec_ids"].shape[0]):  # the reference's way: one decoder forward per row
            n = int(batch["dec_mask"][r].sum())
            prefix = ro.latents[batch["dec_sample"][r], batch["dec_index"][r]][None]
            h = dec.hidden(lm, prefix, batch["dec_ids"][r:r + 1, :n], batch["dec_mask"][r:r + 1, :n])
            logits = dec.output_head(lm)(h[0, prefix.shape[1] - 1:-1])
            nll = torch.nn.functional.cross_entropy(logits, batch["dec_labels"][r, :n], reduction="sum")
            per_slot.setdefault(int(batch["dec_slot"][r]), []).append((nll, n))
        want = torch.stack([sum(x for x, _ in v) / (len(v) if norm == "sequence" else sum(k for _, k in v))
                            for v in per_slot.values()]).mean()
        assert torch.allclose(got, want, rtol=1e-9), (got.item(), want.item())
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip_and_decoder_free_inference(tiny, name):
    cfg, _ = tiny(method=name, **LATENT, **{"train.epochs": 3, "simcot.decoder": "small",
                                            "simcot.small_layers": 1, "train.run_name": f"rt-{name}"})
    summary = run_training(cfg)
    ckpt = Path(summary["checkpoint"])
    # training-side model, decoder included
    cfg_t, full, dev = load_checkpoint_model(ckpt, inference=False)
    # inference-side model: no step decoder is built at all
    cfg_i, infer, _ = load_checkpoint_model(ckpt, inference=True)
    assert infer.model.step_decoder is None
    assert (full.model.step_decoder is not None) == name.startswith("simcot")
    shared = {k: v for k, v in full.model.state_dict().items() if not k.startswith("step_decoder.")}
    assert shared.keys() == infer.model.state_dict().keys()
    assert all(torch.equal(v, infer.model.state_dict()[k]) for k, v in shared.items())
    exs = full.examples["test"]
    r_full = evaluate(full.model, full.method, exs, full.tok, cfg_t.eval, cfg_t.data.answer_prefix, "test", dev,
                      epoch=3)
    r_inf = evaluate(infer.model, infer.method, exs, infer.tok, cfg_i.eval, cfg_i.data.answer_prefix, "test", dev,
                     epoch=3)
    assert [p["generated"] for p in r_full.predictions] == [p["generated"] for p in r_inf.predictions]
    assert r_full.accuracy == pytest.approx(summary["test_accuracy"])
    if name.startswith("simcot"):
        assert "decoder_step_match" in r_full.metrics and "decoder_step_match" not in r_inf.metrics
    if name in ("coconut", "codi", "simcot-coconut", "simcot-codi"):
        assert {"latent_cos_within", "latent_effective_rank", "latent_norm"} <= r_inf.metrics.keys()


def test_checkpoint_with_a_foreign_key_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, _ = tiny(**{"train.epochs": 1, "train.run_name": "foreign"})
    ckpt = Path(run_training(cfg)["checkpoint"])
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["projection.fc1.weight"] = torch.zeros(2, 2)
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not match the model built from its config: missing \[\], "
                                         r"unexpected \['projection.fc1.weight'\]"):
        load_checkpoint_model(ckpt)


def test_decode_prints_each_latent_beside_its_gold_step(tiny, tmp_path):
    cfg, _ = tiny(method="simcot-coconut", **LATENT, **{"train.epochs": 3, "train.run_name": "dec",
                                                        "simcot.decoder": "small", "simcot.small_layers": 1})
    ckpt = run_training(cfg)["checkpoint"]
    res = decode_latents(ckpt, split="test", n=3, overrides={"tracking.enabled": False})
    assert len(res) == 3 and all(len(r["slots"]) == 2 for r in res)  # 2 latent groups at the final stage
    assert all(r["slots"][0]["gold"] for r in res)
    text = format_results(res)
    assert "latent 0:" in text and "latent 1:" in text and "gold:" in text
    one = decode_latents(ckpt, question="3+4-2", overrides={"tracking.enabled": False})
    assert one[0]["question"] == "3+4-2" and len(one[0]["slots"]) == 2 and not one[0]["slots"][0]["gold"]
    # a data file of the user's, logged to MLflow as an artifact of a decode run
    from mlflow.tracking import MlflowClient

    data = tmp_path / "mine.txt"
    data.write_text("5+3-2||<<5+3=8>> <<8-2=6>> #### 6\n9-4+1||<<9-4=5>> <<5+1=6>> #### 6\n")
    uri = f"sqlite:///{tmp_path / 'dec.db'}"
    mine = decode_latents(ckpt, data=str(data), n=5, out=str(tmp_path / "dec.jsonl"),
                          overrides={"tracking.enabled": True, "tracking.uri": uri})
    assert [r["question"] for r in mine] == ["5+3-2", "9-4+1"] and mine[0]["slots"][1]["gold"] == "<<8-2=6>>"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.tags["method"] == "simcot-coconut"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "decoded_latents")] == ["decoded_latents/dec.jsonl"]
    with pytest.raises(ValueError, match="simcot decode needs a SIM-CoT checkpoint"):
        plain = run_training(tiny(**{"train.epochs": 1, "train.run_name": "plain"})[0])["checkpoint"]
        decode_latents(plain, overrides={"tracking.enabled": False})


def test_coconut_starts_from_a_cot_checkpoint_and_sweeps_latent_counts(tiny, monkeypatch):
    import simcot.train.runner as runner

    cot = run_training(tiny(**{"train.epochs": 2, "train.run_name": "cot-init"})[0])
    logged = {}
    real = runner.make_tracker

    class Spy:
        def __init__(self, t):
            self.t = t

        def __getattr__(self, k):
            return getattr(self.t, k)

        def log_metrics(self, m, step):
            logged.update(m)

    monkeypatch.setattr(runner, "make_tracker", lambda *a, **k: Spy(real(*a, **k)))
    cfg, _ = tiny(method="coconut", **LATENT, **{"train.init_from": cot["run_dir"], "coconut.stage_offset": 1,
                                                 "train.epochs": 1, "train.run_name": "coco",
                                                 "eval.latent_sweep": "0,3"})
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=Path(cot["checkpoint"]))
    _, cot_model, _ = load_checkpoint_model(cot["checkpoint"])
    assert all(torch.equal(p, cot_model.model.state_dict()[k]) for k, p in built.model.state_dict().items())
    summary = run_training(cfg)
    assert {"test_latents_0_accuracy", "test_latents_3_accuracy"} <= summary.keys()
    assert {"test/latents_3/accuracy", "test/latents_3/latent_cos_within", "test/latents_0/accuracy"} <= logged.keys()
    assert "test/latents_0/latent_norm" not in logged  # no latents, no latent metrics


def test_simcot_codi_run_records_its_losses_latent_health_and_decoded_latents(tiny, tmp_path):
    """What a latent method adds to the MLflow record, read back from a real SQLite store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg, _ = tiny(method="simcot-codi", **LATENT, **{"train.epochs": 1, "tracking.enabled": True, "tracking.uri": uri,
                                                     "simcot.decoder": "small", "simcot.small_layers": 1,
                                                     "eval.latent_sweep": "1,3"})
    run_id = run_training(cfg)["run_id"]
    client = MlflowClient(uri)
    path = client.download_artifacts(run_id, "decoded_latents/test.jsonl", str(tmp_path))
    rows = [json.loads(l) for l in Path(path).read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["slots"]) == 3 for r in rows)  # 2 fed latents + the final one
    run = client.get_run(run_id)
    m, tags = run.data.metrics, run.data.tags
    for part in ("loss", "ce", "teacher_ce", "distill", "decoder_ce"):
        assert len(client.get_metric_history(run_id, f"train/{part}")) == 4, part  # 64 rows / 16, every step
    assert m["train/loss"] > m["train/decoder_ce"] > 0
    for split in ("val", "test"):
        assert -1.0 <= m[f"{split}/latent_cos_within"] <= 1.0 and -1.0 <= m[f"{split}/latent_cos_across"] <= 1.0
        assert 1.0 <= m[f"{split}/latent_effective_rank"] <= 2.0 + 1e-6  # 2 latents per sample
        assert m[f"{split}/latent_norm"] > 0 and 0.0 <= m[f"{split}/decoder_step_match"] <= 1.0
    assert {f"test/latents_{k}/accuracy" for k in (1, 3)} <= set(m) and tags["n_latents"] == "2"
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/loss.png", "plots/accuracy_vs_latents.png"}


def test_copy_decoder_starts_from_the_init_from_weights(tiny):
    """train.init_from loads the LM before the method copies it: the SIM-CoT decoder is a copy of
    the CoT model, not of the random initialisation."""
    cot, _ = tiny(**{"train.epochs": 1, "train.run_name": "cot0"})
    ckpt = Path(run_training(cot)["checkpoint"])
    cfg, _ = tiny(method="simcot-coconut", **LATENT, **{"train.init_from": str(ckpt), "simcot.decoder": "copy"})
    built = build(cfg, Path(cfg.train.out_dir) / "probe", init_from=ckpt)
    lm = built.model.lm.state_dict()
    dec = built.model.step_decoder.lm.state_dict()
    saved = {k[3:]: v for k, v in load_weights(ckpt).items() if k.startswith("lm.")}
    assert dec.keys() == lm.keys()
    for k, v in saved.items():
        assert torch.equal(lm[k], v) and torch.equal(dec[k], v), k
