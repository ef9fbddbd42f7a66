"""Fused linear cross-entropy vs the materialising baselines and vs its previous implementation:
peak memory, memory held from forward to backward, and fwd+bwd time.

"previous" is the implementation before this one (commit faa573e), kept below in this file so
that both run in the same session: gradients made in forward (an fp32 V x H dW per call held until
backward), 256-row chunks. The current one ("fused-torch") places the gradients by a memory
budget (``hold_gradients`` in ``simcot.kernels.linear_cross_entropy``): made in forward and held
when dW (4·V·H bytes) is under it, as at every CPU shape here, else recomputed in backward; both
in chunks of H rows. "fused-torch-recompute" forces the recompute placement (``hold_mib=0``).

CPU (default): fp32 and bf16, V in {32000, 128256}, shapes small enough for a shared 2-core
machine. Each (shape, variant) runs in a fresh subprocess: the inputs (hidden, weight, targets)
are built, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5, Linux >= 4.0),
one forward+backward runs, and the reported
memory is ``VmHWM - VmRSS`` (the peak resident set during the step minus what was resident just
before it: inputs, libraries). The gradients the step leaves (dX, dW) count in every variant.
"held" is the RSS after the forward minus before it: what one call keeps until its backward
(CODI makes two calls before one backward, so it holds twice that).
Each RSS reading first trims glibc's heap (malloc_trim), so RSS follows the live tensors. Time is
measured separately, in one process per shape that alternates the variants for --iters rounds
(after one warm-up step each), so that load from other processes on a shared machine falls on
all variants alike; the "vs eager" and "vs previous" times are medians over rounds of the
within-round ratios.
The process CPU time (``time.process_time``, all threads) is reported too: it is less sensitive
to other processes taking the cores, though not to their memory traffic. A variant whose single
step takes longer than --max-seconds keeps its first-step time instead and is not interleaved.

    python benchmarks/bench_linear_cross_entropy.py                 # CPU, ~7 min (--iters 3) at load 15
    python benchmarks/bench_linear_cross_entropy.py --quick         # small shapes, a smoke run
    python benchmarks/bench_linear_cross_entropy.py --variants eager,fused-torch,fused-torch-previous,fused-torch-recompute

GPU (``--device cuda``, NOT MEASURED here: written for a GPU user): bf16, H=4096, V=128256,
N in {1k, 4k, 16k, 32k}; eager (with and without the fp32 upcast of the logits), torch.compile,
PyTorch's chunked ``F.linear_cross_entropy``, liger-kernel if importable, and ours (Triton and the
chunked PyTorch path, each also in its previous version). CUDA events for time;
``torch.cuda.max_memory_allocated`` minus the inputs for memory; an OOM is recorded, not fatal.

Results go to benchmarks/results/linear_cross_entropy_<device>.{json,md} (``results_io``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # results_io sits beside this script (benchmarks/ holds no simcot/ to shadow)
    sys.path.insert(0, str(HERE))

from results_io import write_results  # noqa: E402

CPU_SHAPES = [(1024, 512, 32000, "float32"), (512, 256, 128256, "float32"), (512, 256, 128256, "bfloat16")]
CPU_QUICK = [(512, 128, 8000, "float32")]  # (N, H, V, dtype)
GPU_SHAPES = [(n, 4096, 128256, "bfloat16") for n in (1024, 4096, 16384, 32768)]


# ------------------------------------------------------------------- the previous implementation


class PreviousLinearCrossEntropy(torch.autograd.Function):
    """The op as it was at faa573e, reduction="mean": dX and dW made in forward, chunk by chunk
    (dW added into an fp32 V x H accumulator per chunk), held until backward, scaled there."""

    @staticmethod
    def forward(ctx, hidden, weight, target, backend):
        from simcot.kernels import linear_cross_entropy as lce

        hidden, target = hidden.contiguous(), target.contiguous()
        n, h = hidden.shape
        v = weight.shape[0]
        cdtype = lce.gemm_dtype(hidden, weight)
        rows = lce._rows_fn(backend)
        wc = weight.to(cdtype)
        loss = torch.empty(n, dtype=lce.acc_dtype(cdtype), device=hidden.device)
        lse = torch.empty_like(loss)
        gx = torch.empty_like(hidden)
        gw = torch.zeros(v, h, dtype=lce.acc_dtype(weight.dtype), device=weight.device)
        n_valid = (target != -100).sum().clamp(min=1).to(loss.dtype)
        step = max(1, min(max(256, 1 << max(n * h // max(v, 1), 1).bit_length() - 1), n))  # the old chunk rule
        opts = dict(ignore_index=-100, z_loss=0.0, smoothing=0.0)
        for s in range(0, n, step):
            e = min(s + step, n)
            xc = hidden[s:e].to(cdtype)
            logits = xc @ wc.T
            rows(logits, target[s:e], None, loss[s:e], lse[s:e], scale=1.0 / n_valid, grad=True, **opts)
            gx[s:e] = logits @ wc
            lce._mm_into_(gw, logits.T, xc, first=False)  # the old _addmm_acc_: acc += a @ b
        ctx.save_for_backward(gx, gw)
        ctx.w_dtype = weight.dtype
        return loss.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        gx, gw = ctx.saved_tensors
        gx.mul_(grad_out.to(gx.dtype))
        gw.mul_(grad_out.to(gw.dtype))
        return gx, gw.to(ctx.w_dtype), None, None


def previous(x, w, y, backend):
    with torch.autocast(x.device.type, enabled=False):
        return PreviousLinearCrossEntropy.apply(x, w, y, backend)


# ------------------------------------------------------------------------------------------ variants


def variants(device: str) -> dict:
    from simcot.kernels import fused_linear_cross_entropy

    out = {
        "eager": lambda x, w, y: F.cross_entropy((x @ w.T).float(), y),
        "fused-torch": lambda x, w, y: fused_linear_cross_entropy(x, w, y, impl="torch"),
        # the other placement whatever the shape: gradients made in backward by recomputing the logits
        "fused-torch-recompute": lambda x, w, y: fused_linear_cross_entropy(x, w, y, impl="torch", hold_mib=0),
        "fused-torch-previous": lambda x, w, y: previous(x, w, y, "torch"),
    }
    if device == "cuda":
        out["eager-no-upcast"] = lambda x, w, y: F.cross_entropy(x @ w.T, y)
        out["torch.compile"] = torch.compile(out["eager"])
        out["fused-triton"] = lambda x, w, y: fused_linear_cross_entropy(x, w, y, impl="triton")
        out["fused-triton-previous"] = lambda x, w, y: previous(x, w, y, "triton")
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


def previous_of(name: str) -> str:
    """The variant a row is compared with as "previous": fused-torch(-recompute) -> fused-torch-previous."""
    return name.removesuffix("-recompute") + "-previous"


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


def pick(device: str, names: str | None) -> dict:
    fns = variants(device)
    if not names:
        return fns
    unknown = [n for n in names.split(",") if n not in fns]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown} for {device}; choose from {list(fns)}")
    return {n: fns[n] for n in names.split(",")}


# ------------------------------------------------------------------------------------------------ CPU


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the RSS read next counts live tensors only:
    a freed block the size of a logits chunk otherwise stays resident or not depending on malloc's
    thresholds, and "held" moved by one chunk between runs of the same code."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status() -> dict[str, int]:
    _trim()
    s = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def memory_worker(name: str, n: int, h: int, v: int, dtype: str) -> dict:
    """One fwd+bwd in this fresh process: peak RSS above the RSS just before it, and the RSS the
    forward leaves for the backward."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    fn = variants("cpu")[name]
    x, w, y = inputs(n, h, v, "cpu", getattr(torch, dtype))
    before = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    t0 = time.perf_counter()
    loss = fn(x, w, y)
    held = _status()["VmRSS"] - before
    loss.backward()
    first = time.perf_counter() - t0
    return {"variant": name, "n": n, "h": h, "v": v, "dtype": dtype, "peak_bytes": _status()["VmHWM"] - before,
            "held_bytes": held, "first_s": first, "loss": loss.item()}


def time_worker(names: list[str], n: int, h: int, v: int, dtype: str, rounds: int) -> dict:
    """Interleaved timing in one process: each round runs every variant once, so load from other
    processes on a shared machine hits all variants alike; ratios are taken within a round."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    fns = variants("cpu")
    x, w, y = inputs(n, h, v, "cpu", getattr(torch, dtype))
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
    return {"wall": times, "cpu": cpu, "threads": torch.get_num_threads()}


def _ratios(r: dict, times: dict, cpu: dict, base: str, key: str) -> None:
    """Median over rounds of the within-round ratio of r's variant to `base`."""
    if r["variant"] in times and base in times:
        r[f"ratio_{key}"] = statistics.median(a / b for a, b in zip(times[r["variant"]], times[base]))
        r[f"cpu_ratio_{key}"] = statistics.median(a / b for a, b in zip(cpu[r["variant"]], cpu[base]))


def run_cpu(shapes, names: list[str], iters: int, max_seconds: float) -> tuple[list[dict], int]:
    rows, threads = [], 0
    for n, h, v, dtype in shapes:
        shape = ["--shape", f"{n},{h},{v},{dtype}"]
        mine = []
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--worker", "memory", "--variant", name, *shape],
                                 capture_output=True, text=True, check=True)
            mine.append(json.loads(out.stdout.strip().splitlines()[-1]))
        # a variant whose single step exceeds the cap keeps its first-step time and sits out the rounds
        fast = [r["variant"] for r in mine if r["first_s"] <= max_seconds]
        out = subprocess.run([sys.executable, __file__, "--worker", "time", "--variant", ",".join(fast), *shape,
                              "--iters", str(iters)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        times, cpu, threads = res["wall"], res["cpu"], res["threads"]
        for r in mine:
            ts = times.get(r["variant"], [r["first_s"]])
            r.update(times_s=ts, median_s=statistics.median(ts), min_s=min(ts))
            if r["variant"] in cpu:
                r["cpu_s"] = statistics.median(cpu[r["variant"]])
            _ratios(r, times, cpu, "eager", "eager")
            if not r["variant"].endswith("-previous"):
                _ratios(r, times, cpu, previous_of(r["variant"]), "previous")
            print(f"  N={n} H={h} V={v} {dtype} {r['variant']:28s} peak {r['peak_bytes'] / 2**20:9.1f} MiB  "
                  f"held {r['held_bytes'] / 2**20:8.1f} MiB  median {r['median_s'] * 1e3:9.1f} ms  "
                  f"({len(ts)} timed)  loss {r['loss']:.6f}", flush=True)
        rows += mine
    return rows, threads


# ------------------------------------------------------------------------------------------------ GPU


def run_cuda(shapes, names: list[str], iters: int) -> list[dict]:
    rows = []
    fns = pick("cuda", ",".join(names))
    for n, h, v, dtype in shapes:
        times_all = {}
        for name, fn in fns.items():
            torch.cuda.empty_cache()
            x, w, y = inputs(n, h, v, "cuda", getattr(torch, dtype))
            row = {"variant": name, "n": n, "h": h, "v": v, "dtype": dtype}
            try:
                for _ in range(2):  # warm-up (and compilation)
                    step(fn, x, w, y)
                torch.cuda.synchronize()
                x.grad = w.grad = None
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss = fn(x, w, y)
                torch.cuda.synchronize()
                row["held_bytes"] = torch.cuda.memory_allocated() - base
                loss.backward()
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
                times_all[name] = times
                row.update(median_s=statistics.median(times), min_s=min(times), times_s=times, loss=loss.item())
                print(f"  N={n} {name:28s} peak {row['peak_bytes'] / 2**20:9.1f} MiB  held "
                      f"{row['held_bytes'] / 2**20:8.1f} MiB  median {row['median_s'] * 1e3:8.2f} ms", flush=True)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
                print(f"  N={n} {name:28s} OOM", flush=True)
            del x, w, y
            rows.append(row)
        for r in rows[-len(fns):]:  # medians of separate runs on an otherwise idle GPU: ratios of medians
            for base, key in (("eager", "eager"), (previous_of(r["variant"]), "previous")):
                if r["variant"] in times_all and base in times_all:
                    r[f"ratio_{key}"] = statistics.median(times_all[r["variant"]]) / statistics.median(times_all[base])
    return rows


# -------------------------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = ["| N | H | V | dtype | variant | peak extra memory (MiB) | vs eager | vs previous | held fwd->bwd (MiB) "
             "| fwd+bwd wall, median (ms) | vs eager | vs previous | process CPU time vs previous |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = [b for b in rows if (b["n"], b["h"], b["v"], b["dtype"]) == (r["n"], r["h"], r["v"], r["dtype"])
                and "error" not in b]
        base = next((b for b in same if b["variant"] == "eager"), None)
        prev = next((b for b in same if b["variant"] == previous_of(r["variant"])), None)
        head = f"| {r['n']} | {r['h']} | {r['v']} | {r['dtype']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | | | |")
            continue
        mem = r["peak_bytes"] / 2**20
        rm = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base else ""
        pm = f"**{r['peak_bytes'] / prev['peak_bytes']:.3f}x**" if prev else ""
        rt = f"{r['ratio_eager']:.2f}x" if "ratio_eager" in r else ""
        pt = f"**{r['ratio_previous']:.2f}x**" if "ratio_previous" in r else ""
        pc = f"{r['cpu_ratio_previous']:.2f}x" if "cpu_ratio_previous" in r else ""
        once = " (1 step)" if len(r["times_s"]) == 1 else ""
        lines.append(f"{head} {mem:.1f} | {rm} | {pm} | {r['held_bytes'] / 2**20:.1f} | "
                     f"{r['median_s'] * 1e3:.1f}{once} | {rt} | {pt} | {pc} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="CPU: stop timing a variant after this long")
    ap.add_argument("--quick", action="store_true", help="small shapes: checks the script, measures nothing useful")
    ap.add_argument("--variants", help="comma-separated subset of the variants (default: all for the device)")
    ap.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        n, h, v, dtype = args.shape.split(",")
        n, h, v = int(n), int(h), int(v)
        res = (memory_worker(args.variant, n, h, v, dtype) if args.worker == "memory"
               else time_worker(args.variant.split(","), n, h, v, dtype, args.iters))
        print(json.dumps(res))
        return
    names = list(pick(args.device, args.variants))
    if args.device == "cpu":
        print("CPU. Memory: peak RSS during one fwd+bwd minus RSS before it (and RSS after the forward: held), each"
              " variant in a fresh process; time: variants interleaved round by round in one process.")
        rows, threads = run_cpu(CPU_QUICK if args.quick else CPU_SHAPES, names, args.iters, args.max_seconds)
    else:
        print("CUDA. Memory: max_memory_allocated during one fwd+bwd minus the inputs.")
        rows, threads = run_cuda(GPU_SHAPES[:1] if args.quick else GPU_SHAPES, names, args.iters), None
    md = table(rows)
    print(md)
    meta = None
    if threads:  # the timing workers' thread count, not this parent's
        from results_io import machine_meta

        meta = machine_meta(args.device)
        meta["threads"] = threads
    name = f"linear_cross_entropy_{args.device}{'_quick' if args.quick else ''}"
    path = write_results(name, {"rows": rows, "variants": names}, md, device=args.device, meta=meta)
    print(f"wrote {path} and its .md")


if __name__ == "__main__":
    main()
