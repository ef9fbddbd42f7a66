"""Fused linear cross-entropy vs the materialising baselines: peak memory and fwd+bwd time.

CPU (default): fp32, V in {32000, 128256}. Each (shape, variant) runs in a fresh subprocess:
the inputs (hidden, weight, targets) are built, the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs`` = 5, Linux >= 4.0), one forward+backward runs, and the reported
memory is ``VmHWM - VmRSS`` (the peak resident set during the step minus what was resident just
before it: inputs, libraries). The gradients the step leaves (dX, dW) count in every variant.
PyTorch's CPU allocator returns large blocks to the OS, so RSS follows the live tensors. Time is
measured separately, in one process per shape that alternates the variants for --iters rounds
(after one warm-up step each), so that load from other processes on a shared machine falls on
all variants alike; the "vs eager" time is the median over rounds of the within-round ratio.
The process CPU time (``time.process_time``, all threads) is reported too: it is less sensitive
to other processes taking the cores, though not to their memory traffic. A variant whose single
step takes longer than --max-seconds keeps its first-step time instead and is not interleaved.

    python benchmarks/bench_linear_cross_entropy.py                 # CPU, ~2-4 min on 2 cores
    python benchmarks/bench_linear_cross_entropy.py --quick         # small shapes, a smoke run

GPU (``--device cuda``, NOT MEASURED here: written for a GPU user): bf16, H=4096, V=128256,
N in {1k, 4k, 16k, 32k}; eager (with and without the fp32 upcast of the logits), torch.compile,
PyTorch's chunked ``F.linear_cross_entropy``, liger-kernel if importable, and ours (Triton and the
chunked PyTorch path). CUDA events for time; ``torch.cuda.max_memory_allocated`` minus the
inputs for memory; an OOM is recorded, not fatal.

Results go to benchmarks/results/linear_cross_entropy_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CPU_SHAPES = [(4096, 512, 32000), (2048, 256, 128256)]  # (N, H, V)
CPU_QUICK = [(512, 128, 8000)]
GPU_SHAPES = [(n, 4096, 128256) for n in (1024, 4096, 16384, 32768)]


# ------------------------------------------------------------------------------------------ variants


def variants(device: str) -> dict:
    from simcot.kernels import fused_linear_cross_entropy

    out = {
        "eager": lambda x, w, y: F.cross_entropy((x @ w.T).float(), y),
        "fused-torch": lambda x, w, y: fused_linear_cross_entropy(x, w, y, impl="torch"),
    }
    if device == "cuda":
        out["eager-no-upcast"] = lambda x, w, y: F.cross_entropy(x @ w.T, y)
        out["torch.compile"] = torch.compile(out["eager"])
        out["fused-triton"] = lambda x, w, y: fused_linear_cross_entropy(x, w, y, impl="triton")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()

            def run_liger(x, w, y):
                r = liger(w, x, y)
                return r[0] if isinstance(r, tuple) else r

            out["liger"] = run_liger
        except ImportError:
            pass
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        out["torch-linear_cross_entropy"] = lambda x, w, y: F.linear_cross_entropy(x, w, y, options=opts)
    return out


def inputs(n, h, v, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100  # some ignored positions, as in a real batch
    return x, w, y.to(device)


def step(fn, x, w, y):
    x.grad = w.grad = None
    loss = fn(x, w, y)
    loss.backward()
    return loss


# ------------------------------------------------------------------------------------------------ CPU


def _status() -> dict[str, int]:
    s = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def memory_worker(name: str, n: int, h: int, v: int) -> dict:
    """One fwd+bwd in this fresh process: peak RSS above the RSS just before it."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    fn = variants("cpu")[name]
    x, w, y = inputs(n, h, v, "cpu", torch.float32)
    before = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    t0 = time.perf_counter()
    loss = step(fn, x, w, y)
    first = time.perf_counter() - t0
    return {"variant": name, "n": n, "h": h, "v": v, "peak_bytes": _status()["VmHWM"] - before, "first_s": first,
            "loss": loss.item()}


def time_worker(names: list[str], n: int, h: int, v: int, rounds: int) -> dict:
    """Interleaved timing in one process: each round runs every variant once, so load from other
    processes on a shared machine hits all variants alike; ratios are taken within a round."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    fns = variants("cpu")
    x, w, y = inputs(n, h, v, "cpu", torch.float32)
    for name in names:  # warm-up
        step(fns[name], x, w, y)
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            step(fns[name], x, w, y)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {"wall": times, "cpu": cpu}


def run_cpu(shapes, iters: int, max_seconds: float) -> list[dict]:
    rows = []
    for n, h, v in shapes:
        shape = ["--shape", f"{n},{h},{v}"]
        for name in variants("cpu"):
            out = subprocess.run([sys.executable, __file__, "--worker", "memory", "--variant", name, *shape],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        mine = [r for r in rows if (r["n"], r["h"], r["v"]) == (n, h, v)]
        # a variant whose single step exceeds the cap keeps its first-step time and sits out the rounds
        fast = [r["variant"] for r in mine if r["first_s"] <= max_seconds]
        out = subprocess.run([sys.executable, __file__, "--worker", "time", "--variant", ",".join(fast), *shape,
                              "--iters", str(iters)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        times, cpu = res["wall"], res["cpu"]
        for r in mine:
            ts = times.get(r["variant"], [r["first_s"]])
            r.update(times_s=ts, median_s=statistics.median(ts), min_s=min(ts))
            if r["variant"] in times and "eager" in times:
                r["ratio_median"] = statistics.median(a / b for a, b in zip(ts, times["eager"]))
                r["cpu_s"] = statistics.median(cpu[r["variant"]])
                r["cpu_ratio_median"] = statistics.median(a / b for a, b in zip(cpu[r["variant"]], cpu["eager"]))
            print(f"  N={n} H={h} V={v} {r['variant']:28s} peak {r['peak_bytes'] / 2**20:9.1f} MiB   "
                  f"median {r['median_s'] * 1e3:9.1f} ms  min {r['min_s'] * 1e3:9.1f} ms  ({len(ts)} timed)  "
                  f"loss {r['loss']:.6f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ GPU


def run_cuda(shapes, iters: int) -> list[dict]:
    rows = []
    fns = variants("cuda")
    for n, h, v in shapes:
        for name, fn in fns.items():
            torch.cuda.empty_cache()
            x, w, y = inputs(n, h, v, "cuda", torch.bfloat16)
            row = {"variant": name, "n": n, "h": h, "v": v}
            try:
                for _ in range(2):  # warm-up (and compilation)
                    step(fn, x, w, y)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(fn, x, w, y)
                torch.cuda.synchronize()
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
                times = []
                for _ in range(iters):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    loss = step(fn, x, w, y)
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b) / 1e3)
                row.update(median_s=statistics.median(times), min_s=min(times), times_s=times, loss=loss.item())
                print(f"  N={n} {name:28s} peak {row['peak_bytes'] / 2**20:9.1f} MiB   "
                      f"median {row['median_s'] * 1e3:8.2f} ms", flush=True)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
                print(f"  N={n} {name:28s} OOM", flush=True)
            del x, w, y
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- report


def table(rows: list[dict], device: str) -> str:
    lines = ["| N | H | V | variant | peak extra memory (MiB) | vs eager | fwd+bwd wall, median (ms) | vs eager "
             "(median of per-round ratios) | min (ms) | vs eager | process CPU time vs eager |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next((b for b in rows if (b["n"], b["h"], b["v"]) == (r["n"], r["h"], r["v"])
                     and b["variant"] == "eager" and "error" not in b), None)
        if "error" in r:
            lines.append(f"| {r['n']} | {r['h']} | {r['v']} | {r['variant']} | {r['error']} | | | | | | |")
            continue
        mem = r["peak_bytes"] / 2**20
        rm = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base else ""
        ratio = r.get("ratio_median", r["median_s"] / base["median_s"] if base else None)
        rt = f"{ratio:.2f}x" if ratio is not None else ""
        rn = f"{r['min_s'] / base['min_s']:.2f}x" if base else ""
        once = " (1 step)" if len(r["times_s"]) == 1 else ""
        rc = f"{r['cpu_ratio_median']:.2f}x" if "cpu_ratio_median" in r else ""
        lines.append(f"| {r['n']} | {r['h']} | {r['v']} | {r['variant']} | {mem:.1f} | {rm} | "
                     f"{r['median_s'] * 1e3:.1f}{once} | {rt} | {r['min_s'] * 1e3:.1f} | {rn} | {rc} |")
    return "\n".join(lines)


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": device,
            "loadavg_1_5_15_at_end": os.getloadavg()}  # other processes on a shared machine
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="CPU: stop timing a variant after this long")
    ap.add_argument("--quick", action="store_true", help="small shapes: checks the script, measures nothing useful")
    ap.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        n, h, v = map(int, args.shape.split(","))
        res = (memory_worker(args.variant, n, h, v) if args.worker == "memory"
               else time_worker(args.variant.split(","), n, h, v, args.iters))
        print(json.dumps(res))
        return
    cmd = "python benchmarks/bench_linear_cross_entropy.py " + " ".join(sys.argv[1:])
    print(f"$ {cmd}")
    if args.device == "cpu":
        print("CPU fp32. Memory: peak RSS during one fwd+bwd minus RSS before it, each variant in a fresh process;"
              " time: variants interleaved round by round in one process.")
        rows = run_cpu(CPU_QUICK if args.quick else CPU_SHAPES, args.iters, args.max_seconds)
    else:
        print("CUDA bf16. Memory: max_memory_allocated during one fwd+bwd minus the inputs.")
        rows = run_cuda(GPU_SHAPES[:1] if args.quick else GPU_SHAPES, args.iters)
    md = table(rows, args.device)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"linear_cross_entropy_{args.device}{'_quick' if args.quick else ''}"
    meta = {"command": cmd, "machine": machine(args.device), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(f"`{cmd}`\n\n{json.dumps(meta['machine'])}\n\n{md}\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
