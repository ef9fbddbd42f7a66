"""Training objectives, one per file, chosen by ``method`` in the config."""

from simcot.train.methods.base import LossOutput, Method, Prompt
from simcot.train.methods.coconut import Coconut
from simcot.train.methods.codi import Codi
from simcot.train.methods.cot import CoT
from simcot.train.methods.nocot import NoCoT
from simcot.train.methods.semcot import SemCoT
from simcot.train.methods.simcot_codi import SimCoTCodi
from simcot.train.methods.simcot_coconut import SimCoTCoconut

METHODS: dict[str, type[Method]] = {m.name: m for m in (NoCoT, CoT, Coconut, Codi, SimCoTCoconut, SimCoTCodi, SemCoT)}

__all__ = ["METHODS", "LossOutput", "Method", "Prompt"]
