"""No-CoT: question -> answer directly (the lower baseline)."""

from __future__ import annotations

from simcot.train.data.examples import Example
from simcot.train.methods.cot import CoT


class NoCoT(CoT):
    name = "nocot"

    def target(self, ex: Example) -> list[int]:
        return ex["a"]
