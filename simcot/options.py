"""The field helper of every typed config dataclass, whichever layer it lives in
(``simcot.models.config``, ``simcot.train.config``): ``opt(default, "doc")``, whose doc
becomes the ``--help`` line."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a help line."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})
