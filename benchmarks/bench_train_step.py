"""Training steps of every method at a real model shape: tokens/s, MFU and peak memory, beside
`simcot plan`'s prediction. Written for a lent GPU (``gpu_checks.sh train``, issue 14).

One process for every setup and method: each method's run is assembled as ``simcot train``
assembles it (``runner.build`` -> DeepSpeed engine -> ``Trainer``), then ``Trainer.train_step`` runs
--warmup steps (default 2) and one measured step (CUDA synchronised around it). No torchrun, no
MLflow, nothing saved, nothing evaluated: a 1B model and an 8B ZeRO-3 model fit one 8-minute command.
Two warm-up steps because under ZeRO-3 the second step of a latent method was a one-off, ~20x
slower than the first and the third (tiny-llama on CPU; why is not known yet).

Setups (--setups, comma-separated; each a model shape, ZeRO stage and LoRA rank):
  1b-full          llama-3.2-1b, full fine-tuning, DeepSpeed ZeRO-0 (bf16 + fp32 master, torch AdamW)
  8b-lora-zero3    llama-3.1-8b, LoRA r=128 (the SIM-CoT authors' 8B recipe), ZeRO-3 on one GPU
  tiny-full, tiny-lora-zero3   the same on tiny-llama, for a CPU rehearsal

    python benchmarks/bench_train_step.py --setups 1b-full,8b-lora-zero3            # the GPU run
    python benchmarks/bench_train_step.py --device cpu --setups tiny-full,tiny-lora-zero3 --quick

Weights are random; the vocabulary is the model's real one (``model.pad_vocab_to``) over a
tokenizer trained on generated arithmetic chains of --chain steps. DeepSpeed's optimizer is
torch's AdamW (``torch_adam``): its fused and CPU Adam are JIT-compiled on first use, which would
spend a minute of the lease on nvcc. Full fine-tuning at 8B on one GPU needs ~100 GB of offloaded
optimizer state: that layout is left to ``simcot plan`` for 8 GPUs.

MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s: the usual dense estimate, which ignores
attention and counts every parameter as trained (with LoRA the real work is ~2/3 of it, and
CODI's or SIM-CoT's extra passes are in the token count). Peak memory is CUDA's
max_memory_allocated since the method's model was built (on CPU: the process's peak RSS, which
never goes down, so only the first row means much). --setup-budget-s skips the methods that would not
finish in time (estimated from the previous method of the same setup) rather than overrun the
lease. Results: benchmarks/results/train_step_<device>[_quick].{json,md} through results_io.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io beside this file (run with -P too)

from results_io import machine_meta, write_results  # noqa: E402

SETUPS = {
    "1b-full": {"model": "llama-3.2-1b", "zero": 0, "lora": 0, "micro_batch": 4},
    "8b-lora-zero3": {"model": "llama-3.1-8b", "zero": 3, "lora": 128, "micro_batch": 4},
    "tiny-full": {"model": "tiny-llama", "zero": 0, "lora": 0, "micro_batch": 2},
    "tiny-lora-zero3": {"model": "tiny-llama", "zero": 3, "lora": 8, "micro_batch": 2},
}
METHOD_OVERRIDES = {
    "cot": {},
    "nocot": {},
    "coconut": {"coconut.c_thought": 2, "coconut.max_latent_stage": 3, "coconut.stage_offset": 4},  # all latent
    "simcot-coconut": {"coconut.c_thought": 2, "coconut.max_latent_stage": 3, "coconut.stage_offset": 4},
    "codi": {"codi.n_latents": 6},
    "simcot-codi": {"codi.n_latents": 6},
}  # SemCoT needs a trained answering model (train.init_from): time it with benchmarks/bench_semcot.py


def overrides(args, setup: dict, method: str, work: Path) -> dict:
    from simcot.models.presets import get_preset

    preset = get_preset(setup["model"])
    real_vocab = preset.config.get("vocab_size", 0) if preset else 0  # the tiny presets have none: the tokenizer's
    batch = setup["micro_batch"]  # one micro-batch per optimizer step: no accumulation
    ds_json = work / "ds_torch_adam.json"
    ds_json.write_text(json.dumps({"steps_per_print": 10**9, "wall_clock_breakdown": False,
                                   "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    return {"method": method, "model.name": setup["model"], "model.pad_vocab_to": real_vocab,
            "model.lora_r": setup["lora"], "model.gradient_checkpointing": args.checkpointing,
            "data.source": "arith", "data.steps": args.chain, "data.max_value": 999, "data.max_operand": 99,
            "data.n_train": batch * (args.warmup + 1), "data.n_val": 0, "data.n_test": 0,
            "train.max_steps": args.warmup + 1, "train.epochs": 1, "train.batch_size": batch,
            "train.micro_batch_size": batch, "train.save": False, "train.warmup_steps": 0,
            "train.precision": "bf16" if args.device == "cuda" else "fp32", "train.device": args.device,
            "train.out_dir": str(work / "runs"), "train.run_name": method, "tracking.enabled": False,
            "deepspeed.enabled": True, "deepspeed.zero_stage": setup["zero"], "deepspeed.config": str(ds_json),
            "simcot.decoder": args.decoder, **METHOD_OVERRIDES[method]}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_method(args, setup: dict, method: str, work: Path) -> dict:
    """Warm-up steps, then one timed step of `method` in this process; frees everything after."""
    import torch

    from simcot.train import runner
    from simcot.train.config import load_config
    from simcot.train.engines.distributed import init_distributed
    from simcot.train.engines.ds_engine import DeepSpeedEngine, build_ds_config, zero3_enabled
    from simcot.train.loop import Trainer, TrainState, epoch_order, peak_memory_mb
    from simcot.train.tracking.tracker import NullTracker

    cfg = load_config(None, overrides(args, setup, method, work))
    init_distributed(cfg)  # one process group of one rank for every method (no-op after the first)
    device = runner.resolve_device(cfg.train.device)
    ds_config = build_ds_config(cfg, world=1, accum=1, on_cpu=device.type == "cpu")
    hf_ds_config = None
    if zero3_enabled(ds_config):  # must exist before the model is built (zero.Init partitions it)
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    runner.seed_everything(cfg.train.seed)
    if device.type == "cuda" and hf_ds_config is None:
        try:  # weights created and random-initialised on the GPU: seconds, not a CPU init of 1B parameters
            with torch.device(device):
                built = runner.build(cfg, work / "runs" / method)
        except Exception as e:  # noqa: BLE001 - a lease is worth more than the seconds: build as simcot train does
            print(f"building on {device} failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
            runner.seed_everything(cfg.train.seed)
            built = runner.build(cfg, work / "runs" / method)
    else:  # ZeRO-3: zero.Init already creates each parameter partitioned on the GPU
        built = runner.build(cfg, work / "runs" / method)
    engine = DeepSpeedEngine(built.model, cfg, cfg.train.max_steps, device, 1, built.method.param_groups,
                             ds_config=ds_config)
    trainer = Trainer(cfg, built.method, engine, built.tok, built.examples, NullTracker(), work / "runs" / method, "")
    build_s = time.perf_counter() - t_build
    state = TrainState()
    trainer._enter_epoch(state)  # the method's epoch-0 settings, as fit() would
    engine.module.train()
    order = epoch_order(len(built.examples["train"]), cfg.train.seed, 0)
    times = []
    for step in range(args.warmup + 1):
        state.step_in_epoch = step
        sync(args.device)
        t0 = time.perf_counter()
        m = trainer.train_step(state, order)
        sync(args.device)
        times.append(time.perf_counter() - t0)
        state.global_step += 1
    params = sum(p.numel() for p in built.model.lm.parameters())
    trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    if zero3_enabled(ds_config):  # partitioned parameters are empty here: their full sizes
        params = sum(getattr(p, "ds_numel", p.numel()) for p in built.model.lm.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in built.model.parameters() if p.requires_grad)
    step_s = times[-1]
    tok_s = m["tokens"] / step_s
    row = {"method": method, "rc": 0, "params": params, "trainable": trainable, "build_s": round(build_s, 2),
           "warmup_s": [round(t, 3) for t in times[:-1]], "step_s": round(step_s, 4), "tokens": m["tokens"],
           "samples": m["samples"], "tokens_per_s": tok_s, "samples_per_s": m["samples"] / step_s,
           "loss": m["loss"], "peak_memory_gib": peak_memory_mb(device) / 1024,
           "mfu": 6 * params * tok_s / (args.peak_tflops * 1e12) if args.peak_tflops else None}
    inner = getattr(engine, "engine", None)
    if inner is not None and hasattr(inner, "destroy"):
        inner.destroy()
    del trainer, engine, built, hf_ds_config, inner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def predicted(args, setup: dict, method: str, seq_len: int) -> dict:
    from simcot.launchers.plan import make_plan

    try:
        plan = make_plan(setup["model"], gpus=1, zero=setup["zero"], offload="none", lora=setup["lora"],
                         micro_batch=setup["micro_batch"], seq_len=seq_len, method=method, decoder=args.decoder,
                         gpu_memory=args.gpu_memory, checkpointing=args.checkpointing)
        return {"plan_gpu_gib": plan.gpu_total_gib, "plan_fits": plan.fits}
    except Exception as e:  # noqa: BLE001 - a preset the planner does not know still gets measured
        return {"plan_error": f"{type(e).__name__}: {e}"}


def markdown(info: dict) -> str:
    md = ["| setup | method | params | tokens/step | step (s) | tokens/s | MFU | peak memory (GiB) | "
          "plan (GiB) | status |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in info["rows"]:
        plan = f"{r['plan_gpu_gib']:.1f}" if "plan_gpu_gib" in r else "n/a"
        if r.get("status", "ok") != "ok":
            md.append(f"| {r['setup']} | {r['method']} | | | | | | | {plan} | {r['status']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f}M"
        md.append(f"| {r['setup']} | {r['method']} | {size} | {r['tokens']:.0f} | {r['step_s']:.3f} "
                  f"| {r['tokens_per_s']:.0f} | {mfu} | {r['peak_memory_gib']:.1f} | {plan} | ok |")
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="1b-full,8b-lora-zero3", help=f"comma-separated: {', '.join(SETUPS)}")
    ap.add_argument("--methods", default=",".join(METHOD_OVERRIDES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--decoder", default="shared", help="SIM-CoT's step decoder (copy doubles the model)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--chain", type=int, default=12, help="steps per generated problem (sets the sequence length)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the measured one (ZeRO-3 with a "
                    "latent rollout: the second step is a one-off ~20x slower than the first and the third, on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s "
                    "(default 989 on CUDA: H100/H200 SXM; none on CPU)")
    ap.add_argument("--gpu-memory", type=float, default=141.0, help="GiB per GPU for the planner's verdict")
    ap.add_argument("--setup-budget-s", default="0", help="per setup (comma-separated, one per setup or one for "
                    "all): skip its methods that would end past this many seconds of it (0: no limit)")
    ap.add_argument("--quick", action="store_true", help="results file named *_quick (a rehearsal, not a figure)")
    ap.add_argument("--results-dir", type=Path, default=None, help="where the results files go "
                    "(default benchmarks/results)")
    args = ap.parse_args()
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    unknown = [s for s in args.setups.split(",") if s and s not in SETUPS]
    if unknown:
        ap.error(f"unknown setup {', '.join(unknown)} (choose from {', '.join(SETUPS)})")
    setups = [s for s in args.setups.split(",") if s]
    budgets = [float(b) for b in args.setup_budget_s.split(",")]
    budgets = budgets * len(setups) if len(budgets) == 1 else budgets
    if len(budgets) != len(setups):
        ap.error(f"--setup-budget-s has {len(budgets)} values for {len(setups)} setups")
    meta = machine_meta(args.device)  # before the runs: the load of the machine at the start
    info = {"device": args.device, "decoder": args.decoder, "peak_tflops": args.peak_tflops, "rows": []}
    name = f"train_step_{args.device}{'_quick' if args.quick else ''}"
    rows = info["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        for setup_name, budget in zip(setups, budgets):
            setup, last, t_setup = SETUPS[setup_name], None, time.perf_counter()
            for method in [m for m in args.methods.split(",") if m]:
                elapsed = time.perf_counter() - t_setup
                guess = f"~{last:.0f} s" if last else "unknown (first of its setup)"
                print(f"-- {setup_name} {method}: estimated {guess}, {elapsed:.0f} s into the setup", flush=True)
                row = {"setup": setup_name, **setup}
                if budget and last and elapsed + last > budget:
                    row.update(method=method, rc=0, status=f"skipped: ~{last:.0f} s more would pass the "
                                                           f"setup's budget of {budget:.0f} s")
                else:
                    t0 = time.perf_counter()
                    try:
                        row.update(run_method(args, setup, method, Path(tmp)), status="ok")
                    except Exception as e:  # noqa: BLE001 - one method's failure must not cost the others
                        import traceback

                        traceback.print_exc()
                        row.update(method=method, rc=1, status=f"failed: {type(e).__name__}: {e}"[:300])
                        gc.collect()
                    last = time.perf_counter() - t0
                    seq = int(row["tokens"] / row["samples"]) if row.get("samples") else 160
                    row.update(predicted(args, setup, method, seq), wall_s=round(last, 1))
                    print(f"-- {setup_name} {method}: {row['status']} in {last:.1f} s", flush=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
                # after every method: a lease's time limit that kills the process keeps what was measured
                write_results(name, info, markdown(info), device=args.device, meta=meta,
                              results_dir=args.results_dir)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()  # or the process aborts at exit
    path = write_results(name, info, markdown(info), device=args.device, meta=meta,
                         results_dir=args.results_dir)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
