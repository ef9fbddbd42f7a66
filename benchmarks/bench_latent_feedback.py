"""Latent-feedback step: the fused op as the rollout calls it vs its previous call and the unfused ops.

One rollout step = ``latent_feedback`` on B rows (half of them thinking, the others done: they
feed the pad embedding into a masked slot), forward only (eval rollout) and forward + backward
(training: gradients to hidden, the projection and the LayerNorm). Modes: Coconut (identity) and
CODI (Linear-GELU-Linear-LayerNorm). Variants:

- "fused-torch": the hand-written epilogue (the CPU path) as ``simcot.models.rollout.feed_back``
  calls it now: the embedding detached, since the done rows' pad embedding has a zero gradient by
  construction, so the backward has no embedding branch;
- "fused-torch-previous": the same op as the rollout called it before: the embedding on autograd,
  so every step's backward zero-fills a dense V x H embedding gradient;
- "unfused": ``latent_feedback_reference`` (F.linear, F.gelu, F.layer_norm, F.embedding,
  torch.where with autograd), embedding on autograd as before;
- on CUDA also "fused-triton" and "fused-triton-previous".

The variants alternate step by step for --iters rounds after warm-up, in one process; the ratios
are medians of the within-round ratios. Memory: the bytes of the tensors one fwd+bwd step
allocates (distinct storages, counted by a dispatch mode in one extra, untimed step), and on CUDA
the peak of ``max_memory_allocated`` above the inputs.

    python benchmarks/bench_latent_feedback.py                  # CPU fp32, H=1024, V=32000
    python benchmarks/bench_latent_feedback.py --quick          # small shapes, a smoke run
    python benchmarks/bench_latent_feedback.py --device cuda    # NOT MEASURED here: bf16, H=4096, V=128256

Results go to benchmarks/results/latent_feedback_<device>.{json,md} (``results_io``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simcot.kernels import latent_feedback

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # results_io sits beside this script (benchmarks/ holds no simcot/ to shadow)
    sys.path.insert(0, str(HERE))

from results_io import write_results  # noqa: E402

BATCHES = (8, 64, 256)
PAD = 0


def make(b, h, v, device, dtype, mode, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    hidden, emb = t(b, h), t(v, h, scale=0.02)
    thinking = (torch.arange(b) % 2 == 0).to(device)
    ids = torch.full((b,), PAD, device=device)  # the rollout's done rows feed the pad embedding
    proj = norm = None
    if mode == "codi":
        proj = (t(h, h, scale=h ** -0.5), t(h), t(h, h, scale=h ** -0.5), t(h))
        norm = (t(h), t(h), 1e-5)
    params = [hidden, emb] + list(proj or []) + list((norm or ())[:2])
    return (hidden, thinking, ids, emb), dict(proj=proj, norm=norm), params


class Allocated(TorchDispatchMode):
    """Bytes of the distinct storages the ATen ops inside the block return."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.storages[st.data_ptr()] = st.nbytes()
        return out


def allocated_bytes(fn, inputs) -> int:
    before = {t.untyped_storage().data_ptr() for t in inputs}
    with Allocated() as probe:
        fn()
    return sum(n for p, n in probe.storages.items() if p not in before)


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


def bench(device, dtype, h, v, iters, batches) -> list[dict]:
    measure = timer(device)
    impls = {"unfused": ("reference", True), "fused-torch-previous": ("torch", True), "fused-torch": ("torch", False)}
    if device == "cuda":
        impls.update({"fused-triton-previous": ("triton", True), "fused-triton": ("triton", False)})
    rows = []
    for mode in ("coconut", "codi"):
        for b in batches:
            (hidden, thinking, ids, emb), kw, params = make(b, h, v, device, dtype, mode)
            up = torch.randn(b, h, device=device, dtype=dtype)
            fns = {}
            for name, (impl, emb_grad) in impls.items():
                e = emb if emb_grad else emb.detach()  # detached: as the rollout now feeds its done rows

                def fwd(impl=impl, e=e):
                    with torch.no_grad():
                        latent_feedback(hidden, thinking, ids, e, **kw, impl=impl)

                def fwd_bwd(impl=impl, e=e):
                    for p in params:
                        p.grad = None
                    latent_feedback(hidden, thinking, ids, e, **kw, impl=impl).backward(up)

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
                    prev = name + "-previous"
                    if prev in impls:
                        res[key.replace("_s", "_vs_previous")] = statistics.median(
                            a / u for a, u in zip(ts, times[prev][key]))
                for p in params:
                    p.grad = None
                res["alloc_bytes"] = allocated_bytes(fns[name]["fwd_bwd_s"], params + [up])
                if device == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    fns[name]["fwd_bwd_s"]()
                    torch.cuda.synchronize()
                    res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
                rows.append(res)
                print(f"  {mode:8s} B={b:4d} {name:22s} fwd {res['fwd_s'] * 1e3:8.3f} ms   "
                      f"fwd+bwd {res['fwd_bwd_s'] * 1e3:8.3f} ms   allocated {res['alloc_bytes'] / 2**20:9.2f} MiB",
                      flush=True)
    return rows


def table(rows):
    lines = ["| mode | B | variant | fwd median (ms) | vs unfused | fwd+bwd median (ms) | vs unfused | vs previous "
             "| allocated per fwd+bwd (MiB) | vs previous |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        prev = next((p for p in rows if (p["mode"], p["b"]) == (r["mode"], r["b"])
                     and p["variant"] == r["variant"] + "-previous"), None)
        vp = f"**{r['fwd_bwd_vs_previous']:.3g}x**" if "fwd_bwd_vs_previous" in r else ""
        mp = f"**{r['alloc_bytes'] / prev['alloc_bytes']:.3g}x**" if prev else ""
        lines.append(f"| {r['mode']} | {r['b']} | {r['variant']} | {r['fwd_s'] * 1e3:.3f} | {r['fwd_ratio']:.2f}x | "
                     f"{r['fwd_bwd_s'] * 1e3:.3f} | {r['fwd_bwd_ratio']:.2f}x | {vp} | "
                     f"{r['alloc_bytes'] / 2**20:.2f} | {mp} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="small shapes: checks the script, measures nothing useful")
    args = ap.parse_args()
    if args.device == "cuda":
        dtype, h, v = torch.bfloat16, 4096, 128256
    else:
        dtype, h, v = torch.float32, 1024, 32000
    batches = BATCHES
    if args.quick:
        h, v, batches = 256, 4000, (8,)
    print(f"{args.device} {dtype} H=P={h} V={v}, half the rows thinking, the others fed the pad embedding")
    rows = bench(args.device, dtype, h, v, args.iters, batches)
    md = f"{args.device}, {str(dtype).replace('torch.', '')}, H = P = {h}, V = {v}\n\n" + table(rows)
    print(md)
    name = f"latent_feedback_{args.device}{'_quick' if args.quick else ''}"
    path = write_results(name, {"rows": rows, "dtype": str(dtype), "H": h, "V": v}, md, device=args.device)
    print(f"wrote {path} and its .md")


if __name__ == "__main__":
    main()
