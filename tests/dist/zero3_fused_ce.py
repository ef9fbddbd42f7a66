"""Two ranks of DeepSpeed ZeRO-3 on CPU (gloo): fused vs unfused LM loss, loss and lm_head grad.

Launched by tests/test_kernel_zero3.py as ``torchrun --standalone --nproc_per_node 2
tests/dist/zero3_fused_ce.py OUT_DIR`` with DS_ACCELERATOR=cpu; each rank writes
OUT_DIR/rank{r}.json and the test compares. Paths, per model (tied and untied lm_head):

- "unfused": ``lm(...).logits`` (ZeRO-3's hooks gather lm_head) + F.cross_entropy;
- "fused-mean": ``shifted_ce`` (gathers lm_head once around the fused op);
- "fused-none": per-token fused loss over all positions.

Both recompute the logits in backward, so they need the whole weight a second time, in backward.

After the training steps every path also evaluates its loss under no_grad *outside*
``engine(...)``, as an evaluation loop may. Inside ``engine(...)`` reading ``lm_head.weight``
already makes DeepSpeed fetch it (an external parameter of the running module), so ``gathered``
finds it whole and stays out of the way; outside, DeepSpeed's automatic fetch is off and
``gathered`` must gather it itself. Each phase records how many times ``GatheredParameters`` was
entered, and the test checks both cases.

Every parameter is partitioned (stage3_param_persistence_threshold=0: otherwise this tiny
model's parameters would all stay whole). The ranks get different numbers of supervised tokens
and 3-row chunks, so their chunk loops run a different number of times: that is harmless
because the loop issues no collective; the gathers around it run once per call on every rank.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import simcot.kernels.linear_cross_entropy as lce  # noqa: E402
from simcot.kernels import fused_linear_cross_entropy, gathered  # noqa: E402
from simcot.models.decoding import body, head  # noqa: E402
from simcot.models.latent_lm import LatentLM  # noqa: E402
from simcot.models.presets import PRESETS  # noqa: E402
from simcot.train.methods.base import IGNORE, shifted_ce  # noqa: E402

VOCAB, STEPS = 96, 2


def batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, VOCAB, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : 3 + 2 * rank] = IGNORE  # rank 1 supervises 8 fewer tokens than rank 0
    return ids, mask, labels


def unfused(model, ids, mask, labels):
    logits = model.lm(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def fused_mean(model, ids, mask, labels):
    return shifted_ce(model.lm, body(model.lm)(input_ids=ids, attention_mask=mask).last_hidden_state, labels)


def fused_none(model, ids, mask, labels):
    h = body(model.lm)(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    y = labels[:, 1:].reshape(-1)
    out = head(model.lm)
    with gathered(out.weight):
        per_tok = fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), out.weight, y, reduction="none")
    return per_tok.sum() / (y != IGNORE).sum()


GATHERS = [0]
_Gathered = deepspeed.zero.GatheredParameters


class CountingGathered(_Gathered):
    def __enter__(self):
        GATHERS[0] += 1
        return super().__enter__()


deepspeed.zero.GatheredParameters = CountingGathered  # gathered() looks it up at call time


def run(fn, tie, rank):
    torch.manual_seed(0)
    cfg = PRESETS["tiny-llama"].hf_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2)
    cfg.tie_word_embeddings = tie
    model = LatentLM(AutoModelForCausalLM.from_config(cfg))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    w = engine.module.lm.get_output_embeddings().weight
    assert w.numel() == 0, "lm_head.weight should be a ZeRO-3 shard outside forward"
    ids, mask, labels = batch(rank)
    losses, grad = [], None
    GATHERS[0] = 0
    for step in range(STEPS):
        loss = engine(fn, ids, mask, labels)
        engine.backward(loss)
        if step == 0:
            grad = safe_get_full_grad(w).tolist()  # a collective: every rank calls it
        engine.step()
        losses.append(loss.item())
    train_gathers, GATHERS[0] = GATHERS[0], 0
    with torch.no_grad():
        eval_loss = fn(engine.module, ids, mask, labels).item()  # outside engine(...)
    engine.destroy()
    return {"losses": losses, "grad": grad, "train_gathers": train_gathers, "eval_loss": eval_loss,
            "eval_gathers": GATHERS[0]}


def main():
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    lce.chunk_rows = lambda n, v, h, device: 3  # tiny chunks: a rank-dependent number of loop iterations
    out = {}
    for tie in (False, True):
        for name, fn in (("unfused", unfused), ("fused-mean", fused_mean), ("fused-none", fused_none)):
            out[f"{'tied' if tie else 'untied'}/{name}"] = run(fn, tie, rank)
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
