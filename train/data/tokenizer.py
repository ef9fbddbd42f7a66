"""Tokenizers and the token layout of a record.

Two kinds of tokenizer, one interface (a ``transformers`` tokenizer); ``build_tokenizer`` picks
the run's from its model config:
- a real model's own tokenizer (``AutoTokenizer.from_pretrained``), with simcot's special tokens
  added once;
- offline, a SentencePiece model trained in well under a second on the task's training text,
  wrapped as ``LlamaTokenizer`` and saved next to the run so a checkpoint carries it.

The text template follows Coconut: ``question\\n`` then each step as ``step\\n`` then
``### answer`` and eos. ``\\n`` is the step separator (a single token in every tokenizer) and
the latent methods' markers are the special tokens below.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TypedDict

from simcot.models.config import ModelConfig
from simcot.models.loading import is_random_init, weights_source
from simcot.train.data.formats import Record

log = logging.getLogger(__name__)

BOT = "<|start-latent|>"
EOT = "<|end-latent|>"
LATENT = "<|latent|>"
SPECIAL_TOKENS = (BOT, EOT, LATENT)
STEP_SEP = "\n"


@dataclass(frozen=True)
class SpecialIds:
    bot: int
    eot: int
    latent: int
    pad: int
    eos: int

    @classmethod
    def of(cls, tok) -> "SpecialIds":
        ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        return cls(bot=ids[0], eot=ids[1], latent=ids[2], pad=tok.pad_token_id, eos=tok.eos_token_id)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a unigram SentencePiece model on `texts` and save it as a HF tokenizer in `out_dir`.

    Byte fallback keeps every character representable; digits are split so numbers are read
    digit by digit (what small arithmetic models need); the special tokens and the step
    separator are single pieces.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=max(vocab_size, 300),
        model_type="unigram", hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        user_defined_symbols=[STEP_SEP, *SPECIAL_TOKENS], normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, character_coverage=1.0,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>",
        bos_piece="<s>", eos_piece="</s>", num_threads=1, shuffle_input_sentence=False,
        minloglevel=2,
    )
    raw = out_dir / "sp"
    raw.mkdir(exist_ok=True)
    (raw / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(raw), pad_token="<pad>", add_prefix_space=False)
    tok.save_pretrained(str(out_dir))
    return load_tokenizer(str(out_dir))


def record_texts(records: Iterable[Record], answer_prefix: str) -> Iterable[str]:
    for r in records:
        yield r["question"]
        yield from r["steps"]
        yield answer_prefix + r["answer"]


def load_tokenizer(name_or_path: str):
    """A HF tokenizer with a pad token and simcot's special tokens (added when missing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as Coconut does; padding is always masked
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no eos token")
    return tok


class Encoded(TypedDict):
    """One record's token ids (``encode_record``): plain id lists, one sample, no padding. The
    tokenized example (``data.examples.Example``) is this plus the row's own fields."""

    q: list[int]  # the question + STEP_SEP, with the tokenizer's bos when it adds one (never eos)
    steps: list[list[int]]  # one id list per reasoning step, each + STEP_SEP, no special tokens
    a: list[int]  # answer_prefix + the answer, then eos
    a_marker: int  # index in `a` of the answer proper's first token: a[:a_marker] ends every prompt
    answer: str  # the gold answer text, what a prediction is scored against


def encode_record(tok, rec: Record, answer_prefix: str) -> Encoded:
    """Token ids of one record: question (+bos), steps, answer (+eos), and where the answer starts.

    ``a_marker`` is the index in ``a`` of the first token of the answer proper (after the
    prefix '### ' and any whitespace token), so ``a[a_marker - 1]`` is the token just before the
    answer: CODI's distillation position (':' for GPT-2, the space after it for LLaMA tokenizers).
    """
    q = tok(rec["question"] + STEP_SEP, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None and q and q[-1] == tok.eos_token_id:
        q = q[:-1]  # some tokenizers append eos when asked for special tokens
    steps = [tok.encode(s + STEP_SEP, add_special_tokens=False) for s in rec["steps"]]
    a = tok.encode(answer_prefix + rec["answer"], add_special_tokens=False)
    return {"q": q, "steps": steps, "a": a + [tok.eos_token_id], "a_marker": _answer_start(tok, a, answer_prefix),
            "answer": rec["answer"]}


def _answer_start(tok, a: list[int], answer_prefix: str) -> int:
    """First index of `a` whose token adds non-whitespace text beyond the prefix."""
    n = len(answer_prefix.rstrip())
    for i in range(1, len(a) + 1):
        if tok.decode(a[:i])[n:].strip():
            return max(i - 1, 1) if n else i - 1
    return len(a)


def load_tokenizer_from(source: str | Path):
    """load_tokenizer naming the folder or hub id (and its tokenizer files) when it fails."""
    try:
        return load_tokenizer(str(source))
    except Exception as e:  # noqa: BLE001 - tokenizers/sentencepiece/json errors name no file
        files = sorted(p.name for p in Path(source).glob("*token*")) if Path(source).is_dir() else []
        where = f"{source} ({', '.join(files)})" if files else str(source)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{where}: cannot load the tokenizer: {type(e).__name__}: {first}") from None


def build_tokenizer(mcfg: ModelConfig, train_records, answer_prefix: str, cache_dir: str | Path):
    """The run's tokenizer; a locally trained one is cached in `cache_dir` and reused."""
    if mcfg.tokenizer:
        return load_tokenizer_from(mcfg.tokenizer)
    if not is_random_init(mcfg):
        return load_tokenizer_from(weights_source(mcfg))
    cache_dir = Path(cache_dir)
    if (cache_dir / "tokenizer_config.json").is_file():
        return load_tokenizer_from(cache_dir)
    log.info("training a SentencePiece tokenizer (vocab %d) on %d records", mcfg.vocab_size, len(train_records))
    return train_sentencepiece(record_texts(train_records, answer_prefix), mcfg.vocab_size, cache_dir)
