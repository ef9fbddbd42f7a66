"""Training steps of every method at a real model shape: tokens/s, MFU and peak memory, beside
`simcot plan`'s prediction. Written for a GPU machine (the measurement of the DeepSpeed issue).

Each method runs `simcot train` (torchrun with --gpus processes) for --steps optimizer steps on a
random-init preset with its real vocabulary (``model.pad_vocab_to``), bf16, the given ZeRO stage,
offload and LoRA, on generated arithmetic chains of --chain steps; every step is logged to a
private MLflow store, and the figures are the medians of the steps after the first (warm-up).

    python benchmarks/bench_train_step.py --model llama-3.2-1b --gpus 1 --zero 0          # full FT
    python benchmarks/bench_train_step.py --model llama-3.1-8b --gpus 1 --zero 3 --offload optimizer
    python benchmarks/bench_train_step.py --model llama-3.1-8b --gpus 1 --lora 128 --zero 0
    python benchmarks/bench_train_step.py --model tiny-llama --device cpu --steps 3 --methods cot  # smoke run

MFU = 6 x parameters x tokens/s / (GPUs x peak bf16 FLOP/s): the usual dense estimate, which
ignores attention and counts every parameter as trained (with LoRA the real work is ~2/3 of it,
and CODI's or SIM-CoT's extra passes are in the token count). Results go to
benchmarks/results/train_step_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHOD_OVERRIDES = {
    "cot": {},
    "nocot": {},
    "coconut": {"coconut.c_thought": 2, "coconut.max_latent_stage": 3, "coconut.stage_offset": 4},  # all latent
    "simcot-coconut": {"coconut.c_thought": 2, "coconut.max_latent_stage": 3, "coconut.stage_offset": 4},
    "codi": {"codi.n_latents": 6},
    "simcot-codi": {"codi.n_latents": 6},
}  # SemCoT needs a trained answering model (train.init_from): time it with benchmarks/bench_semcot.py


def run_method(args, method: str, work: Path) -> dict:
    uri = f"sqlite:///{work / 'bench.db'}"
    batch = args.micro_batch * args.gpus
    from simcot.models.presets import get_preset

    preset = get_preset(args.model)
    real_vocab = preset.config.get("vocab_size", 0) if preset else 0  # the tiny presets have none: the tokenizer's
    ov = {"method": method, "model.name": args.model, "model.pad_vocab_to": real_vocab,
          "model.lora_r": args.lora, "model.gradient_checkpointing": args.checkpointing,
          "data.source": "arith", "data.steps": args.chain, "data.max_value": 999, "data.max_operand": 99,
          "data.n_train": batch * args.steps, "data.n_val": 0, "data.n_test": 0,
          "train.max_steps": args.steps, "train.epochs": 1, "train.batch_size": batch,
          "train.micro_batch_size": args.micro_batch, "train.log_every": 1, "train.save": False,
          "train.precision": "bf16" if args.device == "cuda" else "fp32",
          "train.device": args.device, "train.out_dir": str(work / "runs"), "train.run_name": method,
          "train.warmup_steps": 0, "deepspeed.enabled": True, "deepspeed.zero_stage": args.zero,
          "deepspeed.offload_optimizer": "cpu" if args.offload in ("optimizer", "all") else "none",
          "deepspeed.offload_params": "cpu" if args.offload == "all" else "none",
          "tracking.uri": uri, "tracking.experiment": "bench-train-step", "simcot.decoder": args.decoder,
          **METHOD_OVERRIDES[method]}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(args.gpus),
           "-m", "simcot.launchers.cli", "train"] + [f"--{k}={v}" for k, v in ov.items()]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"DS_ACCELERATOR": "cpu"} if args.device == "cpu" else {}))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    row = {"method": method, "wall_s": time.perf_counter() - t0, "rc": p.returncode}
    if p.returncode:
        row["error"] = (p.stderr or p.stdout)[-1500:]
        return row
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-train-step")
    run = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.runName") == method][0]

    def steady(key):
        hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        vals = [m.value for m in hist[1:]] or [m.value for m in hist]
        return statistics.median(vals) if vals else float("nan")

    params = int(run.data.params["model.parameters"])
    tok_s = steady("train/tokens_per_s")
    row.update(params=params, tokens_per_s=tok_s, samples_per_s=steady("train/samples_per_s"),
               peak_memory_gib=max(m.value for m in client.get_metric_history(run.info.run_id,
                                                                             "train/peak_memory_mb")) / 1024,
               mfu=6 * params * tok_s / (args.gpus * args.peak_tflops * 1e12) if args.peak_tflops else None)
    return row


def predicted(args, method: str) -> dict:
    from simcot.launchers.plan import make_plan

    try:
        plan = make_plan(args.model, gpus=args.gpus, zero=args.zero, offload=args.offload, lora=args.lora,
                         micro_batch=args.micro_batch, seq_len=args.seq_len, method=method, decoder=args.decoder,
                         gpu_memory=args.gpu_memory, checkpointing=args.checkpointing)
        return {"plan_gpu_gib": plan.gpu_total_gib, "plan_fits": plan.fits}
    except Exception as e:  # noqa: BLE001 - a preset the planner does not know still gets measured
        return {"plan_error": f"{type(e).__name__}: {e}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--methods", default=",".join(METHOD_OVERRIDES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpus", type=int, default=1, help="processes (GPUs) on this machine")
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--offload", default="none", choices=["none", "optimizer", "all"])
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--decoder", default="shared", help="SIM-CoT's step decoder (copy doubles the model)")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--chain", type=int, default=12, help="steps per generated problem (sets the sequence length)")
    ap.add_argument("--seq-len", type=int, default=160, help="sequence length told to the planner")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s per GPU "
                    "(default 989 on CUDA: H100/H200 SXM; none on CPU)")
    ap.add_argument("--gpu-memory", type=float, default=141.0, help="GiB per GPU for the planner's verdict")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per method")
    ap.add_argument("--out", default="", help="results file (default benchmarks/results/train_step_<device>.json)")
    args = ap.parse_args()
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m for m in args.methods.split(",") if m]:
            row = {**run_method(args, method, Path(tmp)), **predicted(args, method)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"model": args.model, "device": args.device, "gpus": args.gpus, "zero": args.zero,
            "offload": args.offload, "lora": args.lora, "decoder": args.decoder, "micro_batch": args.micro_batch,
            "command": "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:]), "rows": rows}
    if args.device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"train_step_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    md = [f"`{info['command']}` ({info.get('gpu', args.device)})", "",
          "| method | tokens/s | samples/s | MFU | peak memory (GiB) | plan (GiB/GPU) | status |",
          "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["rc"]:
            md.append(f"| {r['method']} | | | | | {r.get('plan_gpu_gib', float('nan')):.1f} | failed (rc {r['rc']}) |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        md.append(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {mfu} | "
                  f"{r['peak_memory_gib']:.1f} | {r.get('plan_gpu_gib', float('nan')):.1f} | ok |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
