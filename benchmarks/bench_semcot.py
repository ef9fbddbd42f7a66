"""SemCoT's speed claim in our system: generator + answering model vs CoT decoding of the same
answering model, both batched, on the same test questions.

  cot     the answering model (the CoT-SFT run SemCoT starts from) decodes its reasoning and
          answer greedily with a KV cache until eos
  semcot  the generator writes N implicit tokens in one parallel forward; the frozen answering
          model prefills [question, implicit tokens, answer prompt] and decodes the answer

Both go through ``simcot.train.evaluate`` (sorted, padded batches; timing synchronised on GPU),
alternating over --repeats rounds; the ratio is the median of per-round ratios. Accuracy and
generated tokens per sample are reported beside the time. Train the two runs first:

    simcot train --config launchers/recipes/cot-toy.yaml
    simcot train --config launchers/recipes/semcot-toy.yaml
    python benchmarks/bench_semcot.py --cot runs/cot-toy --semcot runs/semcot-toy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from simcot.train.evaluate import evaluate
from simcot.train.runner import load_checkpoint_model


def measure(run: str, n: int, batch_size: int, device: str):
    cfg, built, dev = load_checkpoint_model(run, {"eval.batch_size": batch_size}, device=device)
    examples = built.examples["test"][:n] if n else built.examples["test"]
    if not examples:
        raise SystemExit(f"{run}: its config has no test examples")

    def once():
        return evaluate(built.model, built.method, examples, built.tok, cfg.eval, cfg.data.answer_prefix, "test", dev)

    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cot", default="runs/cot-toy", help="the CoT-SFT run (or checkpoint) SemCoT started from")
    ap.add_argument("--semcot", default="runs/semcot-toy", help="the SemCoT run (or checkpoint)")
    ap.add_argument("--n", type=int, default=250, help="test questions (0 = all)")
    ap.add_argument("--batch-sizes", default="1,64", help="comma-separated evaluation batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="", help="results file (default benchmarks/results/semcot_<device>.json)")
    args = ap.parse_args()
    for run in (args.cot, args.semcot):
        if not Path(run).exists():
            raise SystemExit(f"{run} does not exist: train it first (see this script's --help)")
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        fns = {"cot": measure(args.cot, args.n, bs, args.device), "semcot": measure(args.semcot, args.n, bs, args.device)}
        for f in fns.values():  # warm-up
            f()
        res = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                res[k].append(f())
        ratio = statistics.median(s.seconds / c.seconds for s, c in zip(res["semcot"], res["cot"]))
        for k, rs in res.items():
            r = rs[-1]
            row = {"batch_size": bs, "variant": k, "n": r.n, "accuracy": r.accuracy,
                   "ms_per_sample": statistics.median(x.seconds for x in rs) / r.n * 1e3,
                   "generated_tokens": r.generated_tokens,
                   "time_vs_cot": ratio if k == "semcot" else 1.0}
            rows.append(row)
            print(f"batch {bs:4d} {k:7s} acc {row['accuracy']:.3f}  {row['ms_per_sample']:8.3f} ms/sample  "
                  f"{row['generated_tokens']:5.1f} tokens  time vs cot {row['time_vs_cot']:.3f}x", flush=True)
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda" else "cpu"
    meta = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "", "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg(), "cot": args.cot, "semcot": args.semcot}
    out = Path(args.out or Path(__file__).parent / "results" / f"semcot_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| batch | variant | accuracy | ms / sample | generated tokens | time vs CoT |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['batch_size']} | {r['variant']} | {r['accuracy']:.3f} | {r['ms_per_sample']:.3f} | "
              f"{r['generated_tokens']:.1f} | {r['time_vs_cot']:.3f}x |" for r in rows]
    out.with_suffix(".md").write_text(f"`python benchmarks/bench_semcot.py {' '.join(os.sys.argv[1:])}`\n\n"
                                      f"{json.dumps(meta)}\n\n" + "\n".join(lines) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
