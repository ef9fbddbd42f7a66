"""`simcot decode`: read a SIM-CoT model's latents back as text with its step decoder.

For each question: the latent rollout runs as at evaluation, every latent slot (a group of c
latents for Coconut) is greedy-decoded by the step decoder with a KV cache, and printed beside
the gold step it was aligned with in training; the model's own answer follows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from simcot.models.decoding import greedy_decode, left_pad, trim_at_eos
from simcot.models.rollout import prefill_latents
from simcot.train.assemble import load_checkpoint_model
from simcot.train.engines.checkpoint import load_trainer_state, resolve_checkpoint
from simcot.train.data.formats import read_file
from simcot.train.data.examples import Example
from simcot.train.methods.step_supervision import decode_texts
from simcot.train.data.tokenizer import encode_record
from simcot.train.tracking.tracker import make_tracker

log = logging.getLogger(__name__)


@torch.no_grad()
def decode_examples(model, method, tok, examples: list[Example], epoch, max_new_tokens: int, device,
                    n_latents: int | None = None) -> list[dict]:
    """For each example: its latents decoded slot by slot beside the gold steps, and the answer
    (`n_latents` forces the latent count, else the method's count for each sample)."""
    prompts = [method.eval_prompt(ex, epoch, n_latents=n_latents) for ex in examples]
    ids, mask = left_pad([p.ids for p in prompts], method.special.pad)
    counts = torch.tensor([p.n_latents for p in prompts], device=device)
    state, ro = prefill_latents(model, ids.to(device), mask.to(device), counts, int(counts.max()), method.special.eot)
    answers = greedy_decode(model.lm, state, max_new_tokens, method.special.eos, method.special.pad)
    rows = [r for i, p in enumerate(prompts) for r in method.decode_slots(i, p)]
    texts = decode_texts(model, method.latent_table(model, ro), rows, method.group, tok, method.special.eos,
                         method.special.pad, method.cfg.simcot.max_step_tokens or max_new_tokens) if rows else []
    results = []
    for i, (ex, p) in enumerate(zip(examples, prompts)):
        slots = [{"slot": g, "decoded": text, "gold": tok.decode(gold).strip() if gold else ""}
                 for (j, g, gold), text in zip(rows, texts) if j == i]
        answer = tok.decode(trim_at_eos(answers[i].tolist(), method.special.eos))
        results.append({"question": tok.decode(ex["q"]).strip(), "gold_answer": ex["answer"],
                        "n_latents": p.n_latents, "slots": slots, "generated": answer.strip()})
    return results


def decode_latents(checkpoint: str, question: str = "", split: str = "test", n: int = 20,
                   overrides: dict | None = None, out: str = "", data: str = "") -> list[dict]:
    ckpt = resolve_checkpoint(checkpoint)
    cfg, built, dev = load_checkpoint_model(ckpt, overrides, inference=False)
    if not hasattr(built.method, "decode_slots"):
        raise ValueError(f"simcot decode needs a SIM-CoT checkpoint (method simcot-coconut or simcot-codi); "
                         f"{ckpt} was trained with '{cfg.method}'")
    if question:
        examples = [Example(**encode_record(built.tok, {"question": question, "steps": [], "answer": "?"},
                                            cfg.data.answer_prefix), idx=0)]
    elif data:  # any file simcot reads (format sniffed), its gold steps shown beside the decoded ones
        records = read_file(data, gsm8k_steps=cfg.data.gsm8k_steps)[:n]
        if not records:
            raise ValueError(f"{data}: no records")
        examples = [Example(**encode_record(built.tok, r, cfg.data.answer_prefix), idx=i)
                    for i, r in enumerate(records)]
    else:
        examples = built.examples[split][:n]
        if not examples:
            raise ValueError(f"split '{split}' of source '{cfg.data.source}' is empty")
    epoch = load_trainer_state(ckpt).get("epoch")
    # a typed question has no gold steps to size its latents by: it gets the method's full budget
    results = decode_examples(built.model, built.method, built.tok, examples, epoch, cfg.eval.max_new_tokens, dev,
                              n_latents=built.method.eval_latents(epoch) if question else None)
    path = Path(out) if out else ckpt / "decoded_latents.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    tracker = make_tracker(cfg.tracking, f"decode-{cfg.train.run_name}")
    tracker.set_tags({"method": cfg.method, "simcot.checkpoint": str(ckpt.resolve())})
    tracker.log_artifact(path, "decoded_latents")
    tracker.finish("FINISHED")
    return results


def format_results(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"Q: {r['question']}")
        for s in r["slots"]:
            gold = f"   | gold: {s['gold']}" if s["gold"] else ""
            lines.append(f"  latent {s['slot']}: {s['decoded']}{gold}")
        lines.append(f"  answer: {r['generated']}   (gold {r['gold_answer']})")
    return "\n".join(lines)
