"""Seeded, deterministic task generators (the offline training data).

- :func:`arith_chain`: multi-step arithmetic, ``8+5-3+9`` evaluated left to right, one step per
  operation (``8+5=13``, ``13-3=10``, ``10+9=19``). The step count is a knob, which is what the
  latent-count experiments need: k operations give k reasoning steps.
- :func:`multiplication`: k x k multiplication in the iCoT format (digits least-significant
  first; steps are the shifted partial products with running sums), as in Deng et al.
"""

from __future__ import annotations

import random

from simcot.train.data.formats import Record


def arith_chain(n: int, steps: int, seed: int, *, min_steps: int = 0, max_operand: int = 9,
                max_value: int = 99) -> list[Record]:
    """`n` left-to-right +/- chains with `steps` operations; values stay in 0..max_value."""
    if steps < 1:
        raise ValueError("arith: steps must be >= 1")
    if max_operand < 1 or max_value < 1:
        raise ValueError("arith: need max_operand >= 1 and max_value >= 1")
    lo = min_steps or steps
    if not 1 <= lo <= steps:
        raise ValueError("arith: min_steps must be in 1..steps")
    rng = random.Random(f"arith-{seed}")
    out = []
    for _ in range(n):
        k = rng.randint(lo, steps)
        value = rng.randint(1, min(max_operand, max_value))
        question, chain = str(value), []
        for _ in range(k):
            # the operation first, then an operand that keeps the value inside [0, max_value]
            room = {"+": min(max_operand, max_value - value), "-": min(max_operand, value)}
            op = rng.choice([o for o in "+-" if room[o] >= 1])
            x = rng.randint(1, room[op])
            new = value + x if op == "+" else value - x
            question += f"{op}{x}"
            chain.append(f"{value}{op}{x}={new}")
            value = new
        out.append({"question": question, "steps": chain, "answer": str(value)})
    return out


def _rev_digits(value: int, width: int) -> str:
    """`value` as `width` space-separated digits, least significant first."""
    s = str(value).rjust(width, "0")
    if len(s) > width:
        raise ValueError(f"{value} does not fit in {width} digits")
    return " ".join(reversed(s))


def multiplication_record(a: int, b: int, k: int) -> Record:
    """One k x k problem in the iCoT layout.

    Partial product i is a * b_i * 10^i, written with k+1+i digits; every partial product but
    the first and the last is followed by the running sum in parentheses; the answer has 2k digits.
    """
    b_digits = [int(d) for d in reversed(str(b).rjust(k, "0"))]
    steps, total = [], 0
    for i, d in enumerate(b_digits):
        pp = a * d * 10**i
        total += pp
        step = _rev_digits(pp, k + 1 + i)
        if 0 < i < k - 1:
            step += f" ( {_rev_digits(total, k + 1 + i)} )"
        steps.append(step)
    question = f"{_rev_digits(a, k)} * {_rev_digits(b, k)}"
    return {"question": question, "steps": steps, "answer": _rev_digits(a * b, 2 * k)}


def multiplication(n: int, digits: int, seed: int) -> list[Record]:
    if not 2 <= digits <= 6:
        raise ValueError("mult: digits must be in 2..6")
    rng = random.Random(f"mult-{seed}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return [multiplication_record(rng.randint(lo, hi), rng.randint(lo, hi), digits) for _ in range(n)]
