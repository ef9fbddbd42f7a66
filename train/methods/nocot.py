"""No-CoT: question -> answer directly (the lower baseline)."""

from __future__ import annotations

from simcot.train.methods.cot import CoT


class NoCoT(CoT):
    name = "nocot"

    def target(self, ex: dict) -> list[int]:
        return ex["a"]
