"""SemCoT's claim in our system: generator + answering model vs the same answering model's CoT
and its direct answers, all batched, on the same test questions.

  cot     the answering model (the CoT-SFT run SemCoT starts from) decodes its reasoning and
          answer greedily with a KV cache until eos
  direct  the same model answers at once: the prompt is the question and the answer prefix
          (``cot.direct_eval``; meaningful when it trained on a CoT / direct mix, ``cot.direct_ratio``)
  semcot  the generator writes N implicit tokens in one parallel forward; the frozen answering
          model prefills [question, implicit tokens, answer prompt] and decodes the answer

All go through ``simcot.train.evaluate`` (sorted, padded batches; timing synchronised on GPU),
alternating over --repeats rounds; the ratio is the median of per-round ratios. Accuracy and
generated tokens per sample are reported beside the time. Train the two runs first:

    simcot train --config launchers/recipes/cot-toy.yaml
    simcot train --config launchers/recipes/semcot-toy.yaml
    python benchmarks/bench_semcot.py --cot runs/cot-toy --semcot runs/semcot-toy
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from results_io import machine_meta, write_results
from simcot.train.evaluate import evaluate
from simcot.train.runner import load_checkpoint_model


def measure(run: str, n: int, batch_size: int, device: str, **overrides):
    cfg, built, dev = load_checkpoint_model(run, {"eval.batch_size": batch_size, **overrides}, device=device)
    examples = built.examples["test"][:n] if n else built.examples["test"]
    if not examples:
        raise SystemExit(f"{run}: its config has no test examples")

    def once():
        return evaluate(built.model, built.method, examples, built.tok, cfg.eval, cfg.data.answer_prefix, "test", dev)

    once.cfg = cfg
    return once


def describe(cfg) -> dict:
    """What a run was trained as: enough to read the table without its config."""
    d = {"method": cfg.method, "epochs": cfg.train.epochs, "n_train": cfg.data.n_train, "seed": cfg.train.seed}
    if cfg.method == "cot":
        d["direct_ratio"] = cfg.cot.direct_ratio
    if cfg.method == "semcot":
        d.update(n_thoughts=cfg.semcot.n_thoughts, init_from=cfg.train.init_from)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cot", default="runs/cot-toy", help="the CoT-SFT run (or checkpoint) SemCoT started from")
    ap.add_argument("--semcot", default="runs/semcot-toy", help="the SemCoT run (or checkpoint)")
    ap.add_argument("--n", type=int, default=250, help="test questions (0 = all)")
    ap.add_argument("--batch-sizes", default="1,64", help="comma-separated evaluation batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="", help="results name (default semcot_<device>: benchmarks/results/NAME.json)")
    args = ap.parse_args()
    for run in (args.cot, args.semcot):
        if not Path(run).exists():
            raise SystemExit(f"{run} does not exist: train it first (see this script's --help)")
    rows, trained = [], {}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        fns = {"cot": measure(args.cot, args.n, bs, args.device),
               "direct": measure(args.cot, args.n, bs, args.device, **{"cot.direct_eval": True}),
               "semcot": measure(args.semcot, args.n, bs, args.device)}
        trained = {"answerer": describe(fns["cot"].cfg), "semcot": describe(fns["semcot"].cfg)}
        for f in fns.values():  # warm-up
            f()
        res = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                res[k].append(f())
        for k, rs in res.items():
            r = rs[-1]
            row = {"batch_size": bs, "variant": k, "n": r.n, "accuracy": r.accuracy,
                   "ms_per_sample": statistics.median(x.seconds for x in rs) / r.n * 1e3,
                   "generated_tokens": r.generated_tokens,
                   "time_vs_cot": statistics.median(x.seconds / c.seconds for x, c in zip(rs, res["cot"]))}
            rows.append(row)
            print(f"batch {bs:4d} {k:7s} acc {row['accuracy']:.3f}  {row['ms_per_sample']:8.3f} ms/sample  "
                  f"{row['generated_tokens']:5.1f} tokens  time vs cot {row['time_vs_cot']:.3f}x", flush=True)
    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda" else "cpu"
    a, g = trained["answerer"], trained["semcot"]
    lines = [f"Answerer `{args.cot}`: {a['method']}, {a['epochs']} epochs, {100 * a.get('direct_ratio', 0):.0f} % direct "
             f"examples; SemCoT `{args.semcot}`: {g['n_thoughts']} implicit tokens, {g['epochs']} epochs (all phases); "
             f"{rows[0]['n']} test questions. `cot`: the answerer writes its steps; `direct`: it answers at once "
             "(the prompt ends with the answer prefix); `semcot`: it answers from the generator's implicit tokens.", "",
             "| batch | variant | accuracy | ms / sample | generated tokens | time vs CoT |",
             "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['batch_size']} | {r['variant']} | {r['accuracy']:.3f} | {r['ms_per_sample']:.3f} | "
              f"{r['generated_tokens']:.1f} | {r['time_vs_cot']:.3f}x |" for r in rows]
    out = write_results(args.out or f"semcot_{device}", {"cot": args.cot, "semcot": args.semcot, "trained": trained,
                                                         "rows": rows},
                        "\n".join(lines), device=device, meta=machine_meta(device))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
