"""Training objectives, one per file, chosen by ``method`` in the config."""

from simcot.train.config import ConfigError
from simcot.train.methods.base import LossOutput, Method, Prompt
from simcot.train.methods.coconut import Coconut
from simcot.train.methods.codi import Codi
from simcot.train.methods.cot import CoT
from simcot.train.methods.nocot import NoCoT
from simcot.train.methods.semcot import SemCoT
from simcot.train.methods.simcot_codi import SimCoTCodi
from simcot.train.methods.simcot_coconut import SimCoTCoconut

# in the order tables and plots list them (each SIM-CoT variant after its base)
METHODS: dict[str, type[Method]] = {m.name: m for m in (NoCoT, CoT, Coconut, SimCoTCoconut, Codi, SimCoTCodi, SemCoT)}


def validate_method(cfg) -> None:
    """The method's part of validating a config (``config.validate`` does the rest): its name, then
    its own rules (``Method.validate``)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"config key 'method': unknown method '{cfg.method}' (choose from {', '.join(METHODS)})")
    METHODS[cfg.method].validate(cfg)


__all__ = ["METHODS", "LossOutput", "Method", "Prompt", "validate_method"]
