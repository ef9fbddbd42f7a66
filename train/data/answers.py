"""Answer extraction and matching.

Rules (``eval.match``):
- ``exact`` (default, Coconut's rule): the text after the last answer marker ('###'), numbers
  normalised (``1,000`` = ``1000``, ``3.0`` = ``3``), other text compared with whitespace collapsed.
- ``last_number`` (CODI's rule): the last number in the generated text, compared numerically.
- ``any_number`` (SemCoT's lenient rule): correct if any number in the text equals the gold
  answer. Reported for comparison with that paper only: it rewards listing many numbers.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written as text, or None if it is not one number."""
    t = text.strip().replace(",", "")
    if t.endswith("."):
        t = t[:-1]
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    if d == 0:
        return "0"
    s = format(d, "f")
    return s


def normalize(text: str) -> str:
    num = normalize_number(text)
    return num if num is not None else " ".join(text.split())


def extract(text: str, marker: str = "###") -> str:
    """The predicted answer in `text`: what follows the last marker (all of it if none)."""
    marker = marker.strip()
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()


def numbers(text: str) -> list[str]:
    return [n for n in (normalize_number(m) for m in _NUMBER.findall(text)) if n is not None]


def is_correct(generated: str, gold: str, rule: str = "exact", marker: str = "###") -> bool:
    gold_n = normalize(gold)
    if rule == "exact":
        return normalize(extract(generated, marker)) == gold_n
    found = numbers(generated)
    if rule == "last_number":
        return bool(found) and found[-1] == gold_n
    if rule == "any_number":
        return gold_n in found
    raise ValueError(f"unknown answer rule '{rule}'")
