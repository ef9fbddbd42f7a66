"""Records -> token ids, once per run (not once per epoch), with ``datasets.Dataset.map``."""

from __future__ import annotations

import logging
from typing import TypedDict

from simcot.train.data.formats import Record
from simcot.train.data.tokenizer import Encoded, encode_record

log = logging.getLogger(__name__)


class RowFields(TypedDict, total=False):
    """The row's own fields that ``tokenize`` keeps beside its token ids (``simcot decode``'s
    typed examples have none of them)."""

    question: str  # the raw question text
    steps_text: list[str]  # the raw steps (SemCoT reads the reasoning as text)
    # free-text reasoning and its condensed form, where the source has them (formats.REASONING_FIELDS);
    # on a row without them: absent, or None when other rows of its split have them (a datasets column)
    reasoning: str | None
    condensed_reasoning: str | None


class Example(Encoded, RowFields):
    """A tokenized example: what methods collate and make prompts of, evaluation scores and
    ``simcot decode`` reads. Its token ids are ``Encoded``'s (q, steps, a, a_marker, answer)."""

    idx: int  # the row's index in its split, kept when long rows are dropped (SemCoT's target row)


def example_length(ex: Example) -> int:
    return len(ex["q"]) + sum(len(s) for s in ex["steps"]) + len(ex["a"])


def tokenize(records: list[Record], tok, answer_prefix: str, max_tokens: int = 0,
             num_proc: int = 0) -> list[Example]:
    """Tokenized examples (each keeps its row index `idx` in the split and the raw question)."""
    if not records:
        return []
    # steps_text: the raw steps, for objectives that read reasoning as text (SemCoT's encoder)
    rows = [{"idx": i, "steps_text": r["steps"], **r} for i, r in enumerate(records)]
    try:
        import datasets
    except ImportError:  # a bare image (the lent GPU's) has no datasets/pyarrow: the same rows, one by one
        examples = [{**{k: v for k, v in r.items() if k not in ("steps", "answer")},
                     **encode_record(tok, r, answer_prefix)} for r in rows]
    else:
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_list(rows).map(lambda r: encode_record(tok, r, answer_prefix),
                                                   num_proc=num_proc or None, remove_columns=["steps", "answer"],
                                                   desc=None)
        examples = ds.to_list()
    if max_tokens > 0:
        kept = [ex for ex in examples if example_length(ex) <= max_tokens]
        if len(kept) < len(examples):
            log.info("dropped %d examples longer than %d tokens", len(examples) - len(kept), max_tokens)
        examples = kept
    return examples
