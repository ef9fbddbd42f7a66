"""Batched evaluation: the method's prompt, its prefill (plain or latent rollout), then batched
greedy decoding with a KV cache; exact match of the final answer; predictions as JSONL.
Progress: a tqdm bar on a terminal, else a log line every PROGRESS_EVERY_S seconds (rank 0).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from simcot import parallel
from simcot.models.decoding import CPU_CACHE_BUFFERS, STATIC_BUFFERS, greedy_decode, trim_at_eos
from simcot.parallel import gather_objects, rank_max
from simcot.train.data.answers import extract, is_correct
from simcot.train.data.examples import Example

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # without a terminal: one log line per interval on long splits


class Progress:
    """Samples decoded so far: tqdm on a terminal, else periodic log lines (batch jobs, CI logs)."""

    def __init__(self, total: int, split: str, enabled: bool = True):
        self.total, self.split, self.enabled, self.done = total, split, enabled, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"eval {split}", unit="sample", leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("eval %s: %d/%d samples (%.0f%%), %.1f samples/s", self.split, self.done, self.total,
                     100 * self.done / max(self.total, 1), self.done / max(now - self.t0, 1e-9))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class EvalResult:
    split: str
    n: int
    correct: int
    seconds: float
    generated_tokens: float  # mean generated tokens per sample (answer + any explicit steps)
    predictions: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # method-specific (latent health, ...)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    @property
    def samples_per_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)

    def summary(self, name: str | None = None) -> dict[str, float]:
        """Metrics under `name/` (default the split), e.g. test/accuracy or test/latents_4/accuracy."""
        name = name or self.split
        out = {f"{name}/accuracy": self.accuracy, f"{name}/samples_per_s": self.samples_per_s,
               f"{name}/generated_tokens": self.generated_tokens, f"{name}/n": float(self.n)}
        out.update({f"{name}/{k}": v for k, v in self.metrics.items()})
        return out

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for p in self.predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, method, examples: list[Example], tok, ecfg, answer_prefix: str, split: str,
             device: torch.device, epoch: int | None = None, n_latents: int | None = None,
             temperature: float | None = None) -> EvalResult:
    """Accuracy of greedy decoding on `examples` (every rank gets the same result).

    Prompts are sorted by length so each batch wastes little padding; predictions come back in
    the original order. `n_latents` forces the latent count (latent sweeps; else the method's
    count for each sample),
    `temperature` the configured one (0 = greedy; > 0 samples with eval.top_p). With
    several ranks each evaluates a shard; all run the same number of batches and decode steps
    (ZeRO-3 gathers parameters in every forward), then the results are gathered.
    """
    rank, world = parallel.rank(), parallel.world_size()
    was_training = model.training
    model.eval()
    prompts = [method.eval_prompt(ex, epoch, n_latents=n_latents) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i].ids))
    shard = order[rank::world]
    batches = [shard[i:i + ecfg.batch_size] for i in range(0, len(shard), ecfg.batch_size)]
    n_batches = rank_max(len(batches))
    marker = answer_prefix.strip()
    temperature = ecfg.temperature if temperature is None else temperature
    gen_rng = torch.Generator().manual_seed(ecfg.seed * 1000 + rank)
    local = {"preds": [], "metric_sums": {}, "metric_rows": {}, "correct": 0, "gen_tokens": 0}
    _sync(device)
    t0 = time.perf_counter()
    progress = Progress(len(shard), split, enabled=rank == 0)  # rank 0's shard stands for all
    for b in range(n_batches):
        idx = batches[min(b, len(batches) - 1)] if batches else order[:1]  # extra batches: re-run, discard
        state = method.prefill(model, [prompts[i] for i in idx], device)
        gen = greedy_decode(model.lm, state, ecfg.max_new_tokens, method.special.eos, method.special.pad,
                            synced=world > 1, temperature=temperature, top_p=ecfg.top_p, generator=gen_rng,
                            compile=ecfg.compile)
        if b >= len(batches):
            continue
        for k, v in state.metrics.items():  # a batch may lack a metric (no sample has a step for slot k)
            local["metric_sums"][k] = local["metric_sums"].get(k, 0.0) + float(v) * len(idx)
            local["metric_rows"][k] = local["metric_rows"].get(k, 0) + len(idx)
        for row, i in enumerate(idx):
            ids = trim_at_eos(gen[row].tolist(), method.special.eos)
            text = tok.decode(ids, skip_special_tokens=False)
            ok = is_correct(text, examples[i]["answer"], ecfg.match, marker)
            local["correct"] += ok
            local["gen_tokens"] += len(ids)
            local["preds"].append((i, {"idx": examples[i]["idx"], "gold": examples[i]["answer"],
                                       "prediction": extract(text, marker), "correct": bool(ok),
                                       "generated": text, "n_latents": prompts[i].n_latents}))
        progress.update(len(idx))
    progress.close()
    _sync(device)
    seconds = time.perf_counter() - t0
    CPU_CACHE_BUFFERS.release()  # the last batch's cache buffers: training does not need them
    STATIC_BUFFERS.release()  # a GPU's static decode buffers (--eval.compile), likewise
    if was_training:
        model.train()
    parts = gather_objects(local)
    preds = [p for _, p in sorted((x for part in parts for x in part["preds"]), key=lambda x: x[0])]
    n = len(examples)
    sums: dict[str, float] = {}
    rows: dict[str, int] = {}
    for part in parts:
        for k, v in part["metric_sums"].items():
            sums[k] = sums.get(k, 0.0) + v
            rows[k] = rows.get(k, 0) + part["metric_rows"][k]
    metrics = {k: v / max(rows[k], 1) for k, v in sums.items()}  # over the batches that reported k
    return EvalResult(split, n, sum(p["correct"] for p in parts), seconds,
                      sum(p["gen_tokens"] for p in parts) / max(n, 1), preds, metrics)
