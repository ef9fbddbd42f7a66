"""Training objectives, one per file, chosen by ``method`` in the config."""

from simcot.train.methods.base import LossOutput, Method, Prompt
from simcot.train.methods.cot import CoT
from simcot.train.methods.nocot import NoCoT

METHODS: dict[str, type[Method]] = {m.name: m for m in (NoCoT, CoT)}

__all__ = ["METHODS", "LossOutput", "Method", "Prompt"]
