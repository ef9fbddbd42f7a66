"""Batched latent rollout vs the reference algorithms: training-step time and evaluation throughput.

Training step (forward + backward of a Coconut loss, same weights, same batch):
  batched   the simcot rollout: prefix once with a KV cache, one single-position forward per latent
  multipass Coconut's algorithm on the padded batch: every latent re-runs the whole prefix, no cache
  per-sample a Python loop over samples, each running the multi-pass algorithm unpadded
Evaluation (samples/s at batch 1, 32 and 256, same weights, a fixed number of generated tokens; the
tiny Llama and the tiny GPT-2 the issue measured with, `--eval-models`):
  batched   the batched latent rollout + simcot's decode loop (prompt in length groups, reserved
            KV cache, ready masks; on the CPU the single-token steps run eager attention)
  baseline  Coconut's reference generate: one sample at a time, no KV cache (re-runs the sequence
            per token), `rollout_reference.naive_generate`; the generations are compared token
            for token with the batched ones (column "identical")
  compiled  (--compiled) batched, its single-position steps (latents, <eot>, answer tokens) through
            torch.compile (`--eval.compile`);
            the compile happens in the warm-up call, outside the timed rounds; on the CPU the
            step attention stays one op (`models/step_attention.py`) and inductor fuses the rest
  floor     (CPU) one more batched call at the largest batch under torch.profiler: the share of its
            CPU time in matrix multiplies (the linear layers' `mm`, attention's `bmm`), the linear
            layers' GFLOP/s against a 1024^3 fp32 GEMM timed in the same process, the speed-up
            the batched path would reach if nothing but its matrix multiplies took time, and the
            one it would reach if the single-position steps' attention (`step_attention`, all of
            it: both matmuls, the mask, the softmax) took none: what any attention kernel could win

Every figure is the median of interleaved rounds (each round times every variant once), in one
process with a set thread count (default 1). Results: benchmarks/results/rollout_<device>[_quick].{json,md}.
On a GPU the compiled decode is static (`decoding.decode(static=True)`) and its step runs as CUDA graphs.
    python benchmarks/bench_rollout.py [--device cpu|cuda] [--quick] [--threads N] [--compiled]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from results_io import write_results
from simcot.models import decoding, step_attention
from simcot.models.decoding import greedy_decode, left_pad
from simcot.models.latent_lm import LatentLM
from simcot.models.presets import PRESETS
from simcot.models.rollout import continue_tokens, prefill_latents, run_latents
from simcot.models.rollout_reference import multipass_hidden, naive_generate, per_sample_hidden
from simcot.train.methods.base import IGNORE, right_pad, shifted_ce

V, PAD, BOT, EOT, EOS = 384, 0, 4, 5, 3
MODELS = {"tiny": ("tiny-llama", dict(hidden_size=192, num_layers=4, num_heads=4)),  # the tiny-llama preset
          "small": ("tiny-llama", dict(hidden_size=512, num_layers=8, num_heads=8)),
          "tiny-gpt2": ("tiny-gpt2", dict(hidden_size=192, num_layers=4, num_heads=4))}  # the measurement


def model_of(size: str, device) -> LatentLM:
    torch.manual_seed(0)
    preset, shape = MODELS[size]
    cfg = PRESETS[preset].hf_config(vocab_size=V, **shape)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = PAD, EOS, EOS
    return LatentLM(AutoModelForCausalLM.from_config(cfg).to(device))


def batch_of(bsz: int, n_latents: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: torch.randint(8, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    prefixes = [rnd(8, 24) + [BOT] for _ in range(bsz)]
    conts = [[EOT] + rnd(8, 20) for _ in range(bsz)]
    labels = [[IGNORE] + c[1:] for c in conts]
    ids, mask = left_pad(prefixes, PAD)
    return {"prefixes": prefixes, "conts": conts, "labels": labels, "n": n_latents,
            "ids": ids.to(device), "mask": mask.to(device), "n_latents": torch.full((bsz,), n_latents, device=device),
            "cont_ids": right_pad(conts, PAD).to(device), "cont_mask": right_pad([[1] * len(c) for c in conts], 0).to(device),
            "label_ids": right_pad(labels, IGNORE).to(device)}


def step_batched(model, b):
    ro = run_latents(model, b["ids"], b["mask"], b["n_latents"], b["n"])
    out = continue_tokens(model, ro, b["cont_ids"], b["cont_mask"])
    shifted_ce(model.lm, out.last_hidden_state, b["label_ids"]).backward()


def step_multipass(model, b):
    h = multipass_hidden(model, b["ids"], b["mask"], b["n_latents"], b["n"], b["cont_ids"], b["cont_mask"])
    shifted_ce(model.lm, h, b["label_ids"]).backward()


def step_per_sample(model, b):
    head = model.lm.get_output_embeddings()
    total, count = 0.0, 0
    for p, c, lab in zip(b["prefixes"], b["conts"], b["labels"]):
        h = per_sample_hidden(model, p, b["n"], c)
        y = torch.tensor(lab[1:], device=h.device)
        keep = y != IGNORE
        total = total + torch.nn.functional.cross_entropy(head(h[:-1][keep]), y[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each function over `rounds` rounds, each round calling every one once
    (after one warm-up call each), so a change in machine load hits every variant alike: (wall
    clock, this process's CPU time). On a shared CPU the CPU time is the steadier figure: with one
    thread it is the time the work took, whatever else runs on the machine."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


@torch.no_grad()
def eval_batched(model, b, new_tokens, compile=False):
    state, _ = prefill_latents(model, b["ids"], b["mask"], b["n_latents"], b["n"], EOT, compile=compile)
    # eos -1: always new_tokens steps
    return greedy_decode(model.lm, state, new_tokens, eos_id=-1, pad_id=PAD, compile=compile)


LINEAR, ATTENTION = ("aten::mm", "aten::addmm"), ("aten::bmm", "aten::baddbmm")
STEP_ATTENTION = "simcot_step_attention"  # the profiler range of each call of the steps' attention


@contextlib.contextmanager
def labelled_step_attention():
    """Inside the block each call of `step_attention.cached_step_attention` (the CPU steps' eager
    attention) runs in a profiler range named STEP_ATTENTION, which holds its whole time."""
    inner = step_attention.cached_step_attention

    def labelled(*args, **kwargs):
        with torch.profiler.record_function(STEP_ATTENTION):
            return inner(*args, **kwargs)
    step_attention.cached_step_attention = labelled
    try:
        yield
    finally:
        step_attention.cached_step_attention = inner


def matmul_shares(fn) -> dict:
    """One call of `fn` under torch.profiler (CPU): the shares of its self CPU time spent in the
    linear layers' matrix multiplies, in attention's batched ones, and in the single-position steps'
    attention as a whole (`labelled_step_attention`: its matmuls, mask and softmax), and the linear
    layers' GFLOP/s. The profiler's own per-op cost lands in the rest, so the shares are slight
    underestimates."""
    with labelled_step_attention(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)  # us
    linear = [e for e in events if e.key in LINEAR]
    linear_us = sum(e.self_cpu_time_total for e in linear)
    attention_us = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION)
    step_attention_us = sum(e.cpu_time_total for e in events if e.key == STEP_ATTENTION)  # inclusive
    return {"linear_share": linear_us / total, "attention_share": attention_us / total,
            "step_attention_share": step_attention_us / total,
            "linear_gflops": sum(e.flops for e in linear) / linear_us / 1e3 if linear_us else 0.0}


def gemm_peak_gflops(device, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of one large fp32 matrix multiply (n^3), the best of `repeats` (load only slows it):
    what this device does at this thread count when a multiply is big enough to run at full speed."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def baseline_samples(asked: int, quick: bool, batch_sizes: list[int]) -> int:
    """How many samples the per-sample baseline runs per round: the largest batch's first rows
    (so its generations can be compared with every batch's), as many as asked (4 at most with
    --quick) and as that batch holds: its samples/s divide by this count."""
    return min(asked, 4 if quick else asked, max(batch_sizes))


def eval_baseline(model, b, new_tokens, limit):
    return [naive_generate(model, p, b["n"], EOT, new_tokens, eos_id=-1) for p in b["prefixes"][:limit]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer rounds, new tokens 32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--batch", type=int, default=32, help="training-step batch")
    ap.add_argument("--eval-batches", default="1,32,256", help="evaluation batch sizes, comma-separated")
    ap.add_argument("--latents", type=int, default=6, help="latents per evaluation sample")
    ap.add_argument("--new-tokens", default="32,64", help="generated tokens per answer, comma-separated "
                    "(64 is Coconut's evaluation setting)")
    ap.add_argument("--baseline-samples", type=int, default=8, help="samples the per-sample baseline runs per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (the median counts)")
    ap.add_argument("--compiled", action="store_true", help="also time evaluation with the compiled decode step")
    ap.add_argument("--eval-models", default="tiny,tiny-gpt2",
                    help=f"models evaluated, comma-separated, of {list(MODELS)} (--quick: the first)")
    ap.add_argument("--static", action="store_true",
                    help="the compiled rows decode with static shapes on this device too (a GPU's do anyway, as "
                         "CUDA graphs): on the CPU, gpu_checks.sh's rehearsal of the GPU's path")
    ap.add_argument("--results-base", default="rollout",
                    help="results file name before _<device>[_quick] (gpu_checks.sh decode: rollout_compiled)")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    new_tokens_list = [32] if args.quick else [int(x) for x in str(args.new_tokens).split(",")]
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.static:
        decoding.STATIC_DEVICES = (device.type,)
    use_cpu_time = device.type == "cpu" and args.threads == 1  # else the wall clock (GPU work is not CPU time)
    clock = "CPU time" if use_cpu_time else "wall clock"
    rows, evals, floors = [], [], []
    for size in (["tiny"] if args.quick else ["tiny", "small"]):
        model = model_of(size, device)
        for n in (6, 16):
            b = batch_of(args.batch, n, device)
            wall, cpu = interleaved({name: (lambda f=f: (model.zero_grad(), f(model, b)))
                                     for name, f in (("batched", step_batched), ("multipass", step_multipass),
                                                     ("per_sample", step_per_sample))}, device, rounds)
            t = cpu if use_cpu_time else wall
            rows.append({"model": size, "batch": args.batch, "latents": n, **{f"{k}_s": v for k, v in t.items()},
                         "multipass_over_batched": t["multipass"] / t["batched"],
                         "per_sample_over_batched": t["per_sample"] / t["batched"]})
            print(f"train step  {size:5s} B={args.batch} L={n:2d}: batched {t['batched']:.3f}s | multipass "
                  f"{t['multipass']:.3f}s ({rows[-1]['multipass_over_batched']:.1f}x) | per-sample "
                  f"{t['per_sample']:.3f}s ({rows[-1]['per_sample_over_batched']:.1f}x)", flush=True)
    eval_models = str(args.eval_models).split(",")[:1 if args.quick else None]
    eval_batches = [int(x) for x in args.eval_batches.split(",")]
    limit = baseline_samples(args.baseline_samples, args.quick, eval_batches)
    for size in eval_models:  # evaluation: tiny models (the small one only adds minutes)
        model = model_of(size, device)
        model.eval()
        for new_tokens in new_tokens_list:
            fns, batches = {}, {}
            for bs in eval_batches:
                batches[bs] = b = batch_of(bs, args.latents, device, seed=1)
                fns[bs] = lambda b=b: eval_batched(model, b, new_tokens)
                if args.compiled:
                    fns[f"{bs}c"] = lambda b=b: eval_batched(model, b, new_tokens, compile=True)
            fns["baseline"] = lambda: eval_baseline(model, batches[max(batches)], new_tokens, limit)
            wall, cpu = interleaved(fns, device, rounds)
            t = cpu if use_cpu_time else wall
            ref = eval_baseline(model, batches[max(batches)], new_tokens, limit)
            sps_ref = limit / t["baseline"]
            for bs, b in batches.items():
                gen = eval_batched(model, b, new_tokens)
                # batch_of draws prefixes first and in order: row i is the same sample at every size
                same = all(gen[i].tolist() == ref[i] for i in range(min(bs, limit)))
                sps = bs / t[bs]
                wall_speedup = (bs / wall[bs]) / (limit / wall["baseline"])
                evals.append({"model": size, "batch": bs, "latents": args.latents, "new_tokens": new_tokens,
                              "batched_samples_per_s": sps, "baseline_samples_per_s": sps_ref,
                              "speedup": sps / sps_ref, "speedup_wall": wall_speedup, "identical": same})
                if args.compiled:
                    gen_c = eval_batched(model, b, new_tokens, compile=True)
                    evals[-1].update(compiled_samples_per_s=bs / t[f"{bs}c"], compiled_over_eager=t[bs] / t[f"{bs}c"],
                                     compiled_speedup=bs / t[f"{bs}c"] / sps_ref,
                                     compiled_identical=torch.equal(gen_c, gen))
                print(f"eval        {size:5s} B={bs:3d} L={args.latents}, {new_tokens} new tokens: batched "
                      f"{sps:.1f} samples/s | per-sample no cache {sps_ref:.2f} samples/s | {sps / sps_ref:.1f}x "
                      f"(wall clock {wall_speedup:.1f}x) | identical {same}", flush=True)
            if device.type == "cpu":  # where the largest batch's time goes (a profile: self CPU time per op)
                bs = max(batches)
                shares = matmul_shares(lambda: eval_batched(model, batches[bs], new_tokens))
                peak = gemm_peak_gflops(device)
                speedup = next(e["speedup"] for e in evals
                               if (e["model"], e["batch"], e["new_tokens"]) == (size, bs, new_tokens))
                floors.append({"model": size, "batch": bs, "new_tokens": new_tokens, "speedup": speedup, **shares,
                               "peak_gflops": peak,
                               "bound_matmuls_only": speedup / (shares["linear_share"] + shares["attention_share"]),
                               "bound_attention_free": speedup / (1 - shares["step_attention_share"])})
                print(f"floor       {size:5s} B={bs} {new_tokens} new tokens: linear layers "
                      f"{shares['linear_share']:.0%} of the time at {shares['linear_gflops']:.0f} GFLOP/s "
                      f"(a {peak:.0f} GFLOP/s GEMM), attention matmuls {shares['attention_share']:.0%}: "
                      f"at most {floors[-1]['bound_matmuls_only']:.1f}x "
                      f"if nothing else cost; step attention {shares['step_attention_share']:.0%}: "
                      f"{floors[-1]['bound_attention_free']:.1f}x if it cost nothing", flush=True)
    name = f"{args.results_base}_{device.type}{'_quick' if args.quick else ''}"
    md = [f"Times: medians of {rounds} interleaved rounds, {clock}.", "",
          "| model | batch | latents | batched (s) | multi-pass (s) | vs batched | per-sample (s) | vs batched |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['batch']} | {r['latents']} | {r['batched_s']:.3f} | {r['multipass_s']:.3f} | "
           f"{r['multipass_over_batched']:.1f}x | {r['per_sample_s']:.3f} | {r['per_sample_over_batched']:.1f}x |"
           for r in rows]
    md += ["", "| model | batch | latents | new tokens | batched (samples/s) | per-sample, no cache (samples/s) "
           "| speed-up | speed-up, wall clock | identical |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    md += [f"| {e['model']} | {e['batch']} | {e['latents']} | {e['new_tokens']} | {e['batched_samples_per_s']:.1f} | "
           f"{e['baseline_samples_per_s']:.2f} | {e['speedup']:.1f}x | {e['speedup_wall']:.1f}x | "
           f"{'yes' if e['identical'] else 'NO'} |"
           for e in evals]
    if args.compiled:
        md += ["", "Compiled single-position steps (`--eval.compile`: latents, `<eot>`, answer tokens) against "
               "the eager ones, same batches and rounds:", "",
               "| model | batch | new tokens | compiled (samples/s) | eager (samples/s) | compiled / eager "
               "| compiled / per-sample | identical |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        md += [f"| {e['model']} | {e['batch']} | {e['new_tokens']} | {e['compiled_samples_per_s']:.1f} | "
               f"{e['batched_samples_per_s']:.1f} | {e['compiled_over_eager']:.2f}x | {e['compiled_speedup']:.1f}x | "
               f"{'yes' if e['compiled_identical'] else 'NO'} |" for e in evals]
    if floors:
        md += ["", "Where the largest batch's time goes (one more call under torch.profiler, self CPU time per op; "
               "GFLOP/s against a 1024^3 fp32 GEMM in the same process):", "",
               "| model | batch | new tokens | speed-up | linear layers' matmuls | their GFLOP/s (GEMM's) "
               "| attention's matmuls | rest | speed-up if only the matmuls cost "
               "| step attention, all of it | speed-up if it cost nothing |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {f['model']} | {f['batch']} | {f['new_tokens']} | {f['speedup']:.1f}x | {f['linear_share']:.0%} | "
               f"{f['linear_gflops']:.0f} ({f['peak_gflops']:.0f}) | {f['attention_share']:.0%} | "
               f"{1 - f['linear_share'] - f['attention_share']:.0%} | {f['bound_matmuls_only']:.1f}x | "
               f"{f['step_attention_share']:.0%} | {f['bound_attention_free']:.1f}x |" for f in floors]
    path = write_results(name, {"train_step": rows, "eval": evals, "floor": floors, "rounds": rounds, "clock": clock},
                         "\n".join(md),
                         device=str(device))
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
