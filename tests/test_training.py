"""The training loop: losses fall, resume replays exactly, NaN stops cleanly, batched decoding."""

from pathlib import Path

import pytest
import torch

from simcot.train import loop as loop_mod
from simcot.train.loop import NonFiniteLossError, micro_batches
from simcot.train.runner import run_training

from conftest import crash_at, run_losses


@pytest.mark.parametrize("method", ["cot", "nocot"])
def test_overfitting_one_batch_drives_the_loss_down(tiny, method):
    cfg, _ = tiny(method=method, **{"data.n_train": 16, "train.epochs": 60, "train.lr": 1e-2,
                                    "train.schedule": "constant", "data.n_val": 0, "data.n_test": 0})
    summary = run_training(cfg)
    losses = run_losses(Path(summary["run_dir"]))
    assert len(losses) == 60
    assert losses[60] < 0.25 * losses[1], (losses[1], losses[60])


def test_resume_after_a_crash_gives_the_samerun_losses(tiny, monkeypatch, tmp_path):
    extra = {"train.epochs": 3, "train.save_every": 3, "data.n_train": 48, "train.run_name": "full"}
    cfg, _ = tiny(**extra)
    full = run_losses(Path(run_training(cfg)["run_dir"]))
    assert len(full) == 9

    cfg, ov = tiny(**dict(extra, **{"train.run_name": "crash"}))
    crash_at(monkeypatch, 5, cfg)  # dies after the step-3 checkpoint, mid-epoch 1
    run_dir = Path(cfg.train.out_dir) / "crash"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000003"

    cfg, ov = tiny(**dict(extra, **{"train.run_name": "crash", "train.resume": str(run_dir)}))
    summary = run_training(cfg, ov)
    resumed = run_losses(run_dir)
    assert summary["steps"] == 9
    for step in range(1, 10):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_nan_loss_stops_before_the_optimizer_step(tiny, monkeypatch):
    cfg, _ = tiny(**{"train.save_every": 2, "train.run_name": "nan"})
    real_step = loop_mod.Trainer.train_step

    def poisoned(self, state, order):
        if state.global_step == 3:
            p = next(self.engine.module.parameters())
            with torch.no_grad():
                before = p.clone()
                p.fill_(float("nan"))
            try:
                return real_step(self, state, order)
            finally:
                with torch.no_grad():
                    p.copy_(before)
        return real_step(self, state, order)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4 \(epoch 0, batch 3\): loss=nan.*"
                                                 r"the last checkpoint \(.*step_0000002\) is intact"):
        run_training(cfg)
    ckpt = Path(cfg.train.out_dir) / "nan" / "checkpoints" / "step_0000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()


def test_global_batch_is_the_same_for_any_world_size():
    order = list(range(64))
    one = [i for mb in micro_batches(order, 1, 32, 8, 0, 1) for i in mb]
    two = sorted(i for r in range(2) for mb in micro_batches(order, 1, 32, 8, r, 2) for i in mb)
    four = sorted(i for r in range(4) for mb in micro_batches(order, 1, 32, 8, r, 4) for i in mb)
    assert sorted(one) == two == four == list(range(32, 64))


def test_a_run_with_saving_off_writes_no_checkpoint(tiny):
    cfg, _ = tiny(**{"train.save": False, "train.epochs": 2, "train.save_every": 2, "train.run_name": "nosave"})
    summary = run_training(cfg)
    assert summary["steps"] == 8 and summary["checkpoint"] == ""
    assert not (Path(summary["run_dir"]) / "checkpoints").exists() and summary["test_accuracy"] >= 0


def test_a_run_folder_belongs_to_one_run(tiny):
    """Issue 15 (2): reusing a run name wrote into the old folder (metrics appended, `latest` moved,
    pruning deleted the new run's checkpoints). Now refused unless resume or overwrite."""
    from simcot.train.config import ConfigError

    cfg, _ = tiny(**{"train.run_name": "mine", "train.epochs": 1})
    first = run_training(cfg)
    run_dir = Path(first["run_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    cfg, _ = tiny(**{"train.run_name": "mine", "train.epochs": 2, "train.seed": 1})
    with pytest.raises(ConfigError, match=rf"^run folder {run_dir} already exists \(another run's\): resume it with "
                                          rf"--train.resume {run_dir}, choose another --train.run_name, or replace "
                                          rf"it with --train.overwrite true$"):
        run_training(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    assert len(run_losses(run_dir)) == 4
    cfg, _ = tiny(**{"train.run_name": "mine", "train.epochs": 2, "train.seed": 1, "train.overwrite": True})
    second = run_training(cfg)
    assert second["steps"] == 8 and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 8  # only its own
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000008"


def test_default_run_names_differ_within_one_second(tiny, monkeypatch):
    import time

    from simcot.train.runner import claim_run_dir, default_run_name

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    cfg, _ = tiny(**{"train.run_name": ""})
    names = {claim_run_dir(cfg) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("cot-tiny-llama-arith-20260101-000000-") for n in names)
    assert all((Path(cfg.train.out_dir) / n).is_dir() for n in names)
    assert default_run_name(cfg) != default_run_name(cfg)


def test_eval_honours_train_threads_and_shows_progress(tiny, monkeypatch, capsys):
    """Issue 15 (9): `simcot eval` ignored train.threads (only training set it); long splits were
    silent. The flag wins over the checkpoint's config, which wins over torch's default."""
    import simcot.train.evaluate as evaluate_mod
    from simcot.train.runner import run_evaluation

    cfg, _ = tiny(**{"train.run_name": "threads", "train.epochs": 1, "train.threads": 1})
    run_dir = run_training(cfg)["run_dir"]
    before = torch.get_num_threads()
    monkeypatch.setattr(evaluate_mod, "PROGRESS_EVERY_S", 0.0, raising=False)
    try:
        torch.set_num_threads(2)
        capsys.readouterr()
        run_evaluation(run_dir, {"eval.batch_size": 4})  # logs to stderr (setup_logging)
        err = capsys.readouterr().err
        assert torch.get_num_threads() == 1  # the checkpoint's train.threads
        run_evaluation(run_dir, {"train.threads": 2})
        assert torch.get_num_threads() == 2  # the flag
    finally:
        torch.set_num_threads(before)
    lines = [l.split("simcot.train.evaluate: ")[1] for l in err.splitlines() if "simcot.train.evaluate: eval" in l]
    assert [l.split(",")[0] for l in lines] == ["eval test: 4/8 samples (50%)", "eval test: 8/8 samples (100%)"]


def test_overwrite_deletes_only_what_looks_like_a_run_folder(tiny, tmp_path):
    from simcot.train.config import ConfigError
    from simcot.train.runner import claim_run_dir

    precious = tmp_path / "runs" / "notes"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    cfg, _ = tiny(**{"train.run_name": "notes", "train.overwrite": True})
    with pytest.raises(ConfigError, match=r"does not look like a run folder .*; not deleting it$"):
        claim_run_dir(cfg)
    assert (precious / "thesis.tex").is_file()
    cfg, _ = tiny(**{"train.run_name": "..", "train.overwrite": True})
    with pytest.raises(ConfigError, match="does not look like a run folder"):
        claim_run_dir(cfg)
    (precious / "metrics.jsonl").write_text("")
    cfg, _ = tiny(**{"train.run_name": "notes", "train.overwrite": True})
    assert claim_run_dir(cfg) == "notes" and list(precious.iterdir()) == []
