"""Batched latent rollout vs the reference algorithms: training-step time and evaluation throughput.

Training step (forward + backward of a Coconut loss, same weights, same batch):
  batched   the simcot rollout: prefix once with a KV cache, one single-position forward per latent
  multipass Coconut's algorithm on the padded batch: every latent re-runs the whole prefix, no cache
  per-sample a Python loop over samples, each running the multi-pass algorithm unpadded
Evaluation (samples/s, same weights, fixed number of generated tokens):
  batched   batched latent rollout + batched KV-cache greedy decoding
  batch-1   Coconut's reference generate: one sample at a time, no KV cache (re-runs the sequence per token)

Ratios are measured in the same run; results go to benchmarks/results/rollout_<device>.json.
    python benchmarks/bench_rollout.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from simcot.models.decoding import greedy_decode, left_pad
from simcot.models.latent_lm import LatentLM
from simcot.models.presets import PRESETS
from simcot.models.rollout import continue_tokens, prefill_latents, run_latents
from simcot.models.rollout_reference import multipass_hidden, naive_generate, per_sample_hidden
from simcot.train.methods.base import IGNORE, right_pad, shifted_ce

V, PAD, BOT, EOT, EOS = 384, 0, 4, 5, 3
SIZES = {"tiny": dict(hidden_size=192, num_layers=4, num_heads=4),  # the tiny-llama preset
         "small": dict(hidden_size=512, num_layers=8, num_heads=8)}


def model_of(size: str, device) -> LatentLM:
    torch.manual_seed(0)
    cfg = PRESETS["tiny-llama"].hf_config(vocab_size=V, **SIZES[size])
    cfg.pad_token_id = PAD
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


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def eval_batched(model, b, new_tokens):
    with torch.no_grad():
        state, _ = prefill_latents(model, b["ids"], b["mask"], b["n_latents"], b["n"], EOT)
        greedy_decode(model.lm, state, new_tokens, eos_id=-1, pad_id=PAD)  # eos -1: always new_tokens steps


def eval_batch1(model, b, new_tokens, limit):
    for p in b["prefixes"][:limit]:
        naive_generate(model, p, b["n"], EOT, new_tokens, eos_id=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer repeats")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=128, help="simcot's default evaluation batch")
    ap.add_argument("--new-tokens", default="32,64", help="generated tokens per answer, comma-separated "
                    "(64 is Coconut's evaluation setting)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up (the best counts)")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    rows, evals = [], []
    for size in (["tiny"] if args.quick else ["tiny", "small"]):
        model = model_of(size, device)
        for n in (6, 16):
            b = batch_of(args.batch, n, device)
            t = {name: timed(lambda f=f: (model.zero_grad(), f(model, b)), device, repeats)
                 for name, f in (("batched", step_batched), ("multipass", step_multipass),
                                 ("per_sample", step_per_sample))}
            rows.append({"model": size, "batch": args.batch, "latents": n, **{f"{k}_s": v for k, v in t.items()},
                         "multipass_over_batched": t["multipass"] / t["batched"],
                         "per_sample_over_batched": t["per_sample"] / t["batched"]})
            print(f"train step  {size:5s} B={args.batch} L={n:2d}: batched {t['batched']:.3f}s | multipass "
                  f"{t['multipass']:.3f}s ({rows[-1]['multipass_over_batched']:.1f}x) | per-sample "
                  f"{t['per_sample']:.3f}s ({rows[-1]['per_sample_over_batched']:.1f}x)")
        model.eval()
        b = batch_of(args.eval_batch, 6, device, seed=1)
        limit = 4 if args.quick else 8  # batch-1 is slow: time a few samples, report samples/s
        for new_tokens in [int(x) for x in str(args.new_tokens).split(",")]:
            tb = timed(lambda: eval_batched(model, b, new_tokens), device, repeats)
            t1 = timed(lambda: eval_batch1(model, b, new_tokens, limit), device, 1)
            sps_b, sps_1 = args.eval_batch / tb, limit / t1
            evals.append({"model": size, "batch": args.eval_batch, "latents": 6, "new_tokens": new_tokens,
                          "batched_samples_per_s": sps_b, "batch1_nocache_samples_per_s": sps_1,
                          "speedup": sps_b / sps_1})
            print(f"eval        {size:5s} B={args.eval_batch} L=6, {new_tokens} new tokens: batched {sps_b:.1f} "
                  f"samples/s | batch-1 no cache {sps_1:.2f} samples/s | {sps_b / sps_1:.0f}x")
    out = {"device": str(device), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "train_step": rows, "eval": evals,
           "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None}
    path = Path(__file__).parent / "results" / f"rollout_{device.type}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    md = [f"Rollout benchmark, {out['cuda'] or out['machine']} ({out['device']}, {out['threads']} threads, torch "
          f"{out['torch']}): `python benchmarks/bench_rollout.py {' '.join(sys.argv[1:])}`".rstrip(), "",
          "| model | batch | latents | batched (s) | multi-pass (s) | vs batched | per-sample (s) | vs batched |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['batch']} | {r['latents']} | {r['batched_s']:.3f} | {r['multipass_s']:.3f} | "
           f"{r['multipass_over_batched']:.1f}x | {r['per_sample_s']:.3f} | {r['per_sample_over_batched']:.1f}x |"
           for r in rows]
    md += ["", "| model | batch | latents | new tokens | batched (samples/s) | batch-1, no cache (samples/s) | speed-up |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {e['model']} | {e['batch']} | {e['latents']} | {e['new_tokens']} | {e['batched_samples_per_s']:.1f} | "
           f"{e['batch1_nocache_samples_per_s']:.2f} | {e['speedup']:.0f}x |" for e in evals]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
