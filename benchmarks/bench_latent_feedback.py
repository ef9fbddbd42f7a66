"""Latent-feedback step: the fused op vs the unfused PyTorch ops, time per rollout step.

One rollout step = ``latent_feedback`` on B rows (half of them thinking), forward only (eval
rollout) and forward + backward (training: gradients to hidden, the projection, the LayerNorm
and the embedding). Modes: Coconut (identity) and CODI (Linear-GELU-Linear-LayerNorm).
Variants: "unfused" (``latent_feedback_reference``: F.linear, F.gelu, F.layer_norm,
F.embedding, torch.where with autograd), "fused-torch" (the hand-written epilogue in PyTorch,
the CPU path), and on CUDA "fused-triton". The variants alternate step by step for --iters
rounds after warm-up, in one process; "vs unfused" is the median of the within-round ratios.

    python benchmarks/bench_latent_feedback.py                  # CPU fp32, H=1024, V=32000
    python benchmarks/bench_latent_feedback.py --device cuda    # NOT MEASURED here: bf16, H=4096, V=128256

The embedding gradient is dense (V x H, as nn.Embedding's), so on CPU the backward of every
variant is dominated by zero-filling it; the forward column isolates the epilogue.
Results go to benchmarks/results/latent_feedback_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from simcot.kernels import latent_feedback

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (8, 64, 256)


def make(b, h, v, device, dtype, mode, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    hidden, emb = t(b, h), t(v, h, scale=0.02)
    thinking = (torch.arange(b) % 2 == 0).to(device)
    ids = torch.randint(0, v, (b,), generator=g).to(device)
    proj = norm = None
    if mode == "codi":
        proj = (t(h, h, scale=h ** -0.5), t(h), t(h, h, scale=h ** -0.5), t(h))
        norm = (t(h), t(h), 1e-5)
    params = [hidden, emb] + list(proj or []) + list((norm or ())[:2])
    return (hidden, thinking, ids, emb), dict(proj=proj, norm=norm), params


def timer(device):
    if device == "cuda":
        def measure(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
    else:
        def measure(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return measure


def bench(device, dtype, h, v, iters) -> list[dict]:
    measure = timer(device)
    impls = {"unfused": "reference", "fused-torch": "torch"}
    if device == "cuda":
        impls["fused-triton"] = "triton"
    rows = []
    for mode in ("coconut", "codi"):
        for b in BATCHES:
            args, kw, params = make(b, h, v, device, dtype, mode)
            up = torch.randn(b, h, device=device, dtype=dtype)
            fns = {}
            for name, impl in impls.items():
                def fwd(impl=impl):
                    with torch.no_grad():
                        latent_feedback(*args, **kw, impl=impl)

                def fwd_bwd(impl=impl):
                    for p in params:
                        p.grad = None
                    latent_feedback(*args, **kw, impl=impl).backward(up)

                fns[name] = {"fwd_s": fwd, "fwd_bwd_s": fwd_bwd}
            times = {name: {"fwd_s": [], "fwd_bwd_s": []} for name in impls}
            for key in ("fwd_s", "fwd_bwd_s"):
                for name in impls:  # warm-up
                    for _ in range(3):
                        fns[name][key]()
                for _ in range(iters):  # interleaved rounds: load from other processes hits all variants alike
                    for name in impls:
                        times[name][key].append(measure(fns[name][key]))
            for name in impls:
                res = {"mode": mode, "b": b, "variant": name}
                for key in ("fwd_s", "fwd_bwd_s"):
                    ts = times[name][key]
                    res[key] = statistics.median(ts)
                    res[key.replace("_s", "_ratio")] = statistics.median(
                        a / u for a, u in zip(ts, times["unfused"][key]))
                rows.append(res)
                print(f"  {mode:8s} B={b:4d} {name:13s} fwd {res['fwd_s'] * 1e3:8.3f} ms   "
                      f"fwd+bwd {res['fwd_bwd_s'] * 1e3:8.3f} ms", flush=True)
    return rows


def table(rows):
    lines = ["| mode | B | variant | fwd median (ms) | vs unfused | fwd+bwd median (ms) | vs unfused |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['b']} | {r['variant']} | {r['fwd_s'] * 1e3:.3f} | "
                     f"{r['fwd_ratio']:.2f}x | {r['fwd_bwd_s'] * 1e3:.3f} | {r['fwd_bwd_ratio']:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    cmd = "python benchmarks/bench_latent_feedback.py " + " ".join(sys.argv[1:])
    print(f"$ {cmd}")
    if args.device == "cuda":
        dtype, h, v = torch.bfloat16, 4096, 128256
    else:
        dtype, h, v = torch.float32, 1024, 32000
    print(f"{args.device} {dtype} H=P={h} V={v}, half the rows thinking")
    rows = bench(args.device, dtype, h, v, args.iters)
    md = table(rows)
    print(md)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": args.device, "dtype": str(dtype), "H": h, "V": v,
            "loadavg_1_5_15_at_end": os.getloadavg()}  # other processes on a shared machine
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"latent_feedback_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps({"command": cmd, "machine": info,
                                                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows},
                                                    indent=1))
    stem.with_suffix(".md").write_text(f"`{cmd}`\n\n{json.dumps(info)}\n\n{md}\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
