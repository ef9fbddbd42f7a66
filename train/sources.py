"""From a :class:`DataConfig` to train/val/test splits of records (``datasets.Dataset``).

Sources:
- ``arith``, ``mult``: generated; the three splits use disjoint seeds and the validation and
  test problems never appear in training (exact duplicates are removed).
- ``gsm8k``: ``<data_dir>/gsm8k/{train,test}.jsonl``; validation is a seeded hold-out of train.
- ``prosqa``: ``<data_dir>/prosqa/{valid,test}.json``; it has no training split here, so
  ``data.train_file`` must name one (e.g. Coconut's ``prosqa_train.json``).
- a file format (``jsonl``, ``gsm8k-jsonl``, ``aug``, ``icot``, ``coconut``): the splits come
  from ``train_file``/``val_file``/``test_file``; a missing validation file is held out of train.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from simcot.train.config import DataConfig
from simcot.train.formats import READERS, DataError, Record, read_file
from simcot.train import generators

SPLITS = ("train", "val", "test")


def data_dir(cfg: DataConfig) -> Path:
    """The shared data folder: config, then $SIMCOT_DATA_DIR, then ../shared/data near cwd or repo."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if os.environ.get("SIMCOT_DATA_DIR"):
        return Path(os.environ["SIMCOT_DATA_DIR"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


@dataclass
class Splits:
    train: list[Record]
    val: list[Record]
    test: list[Record]
    source: str

    def __getitem__(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise KeyError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {s: len(self[s]) for s in SPLITS}

    def hashes(self) -> dict[str, str]:
        return {s: content_hash(self[s]) for s in SPLITS}


def content_hash(records: list[Record]) -> str:
    """A short, order-sensitive digest of a split: the same data gives the same hash anywhere."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["question"], r["steps"], r["answer"]], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _cap(records: list[Record], n: int) -> list[Record]:
    return records[:n] if n > 0 else records


def _hold_out(records: list[Record], n: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Split `n` seeded random rows off `records`; the rest keep their order."""
    if n <= 0:
        return records, []
    if n >= len(records):
        raise DataError(f"cannot hold out {n} validation rows from a training split of {len(records)}")
    idx = list(range(len(records)))
    random.Random(f"holdout-{seed}").shuffle(idx)
    held = set(idx[:n])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _generated(cfg: DataConfig) -> Splits:
    def make(n: int, seed: int) -> list[Record]:
        if cfg.source == "arith":
            return generators.arith_chain(n, cfg.steps, seed, min_steps=cfg.min_steps,
                                          max_operand=cfg.max_operand, max_value=cfg.max_value)
        return generators.multiplication(n, cfg.digits, seed)

    # Evaluation splits first, then training rows that collide with them are dropped, so a
    # memorising model cannot score on the held-out splits.
    test = make(cfg.n_test, 3 * cfg.seed + 2)
    val = make(cfg.n_val, 3 * cfg.seed + 1)
    seen = {r["question"] for r in test + val}
    train = [r for r in make(int(cfg.n_train * 1.25) + 16, 3 * cfg.seed) if r["question"] not in seen]
    return Splits(train[: cfg.n_train], val, test, cfg.source)


def _from_files(cfg: DataConfig, fmt: str, defaults: dict[str, Path | None]) -> Splits:
    files = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}
    loaded: dict[str, list[Record]] = {}
    for split in SPLITS:
        path = Path(files[split]) if files[split] else defaults.get(split)
        if path is None:
            loaded[split] = []
            continue
        # A user's file given for a named data set (gsm8k, prosqa) may be in any format.
        f = "auto" if files[split] and cfg.source not in READERS else fmt
        loaded[split] = read_file(path, f, gsm8k_steps=cfg.gsm8k_steps)
    if not loaded["train"]:
        raise DataError(f"source '{cfg.source}' has no training split here: set data.train_file")
    train = loaded["train"]
    val = loaded["val"]
    if not val:
        train, val = _hold_out(train, cfg.n_val, cfg.seed)
    return Splits(_cap(train, cfg.n_train), _cap(val, cfg.n_val), _cap(loaded["test"], cfg.n_test), cfg.source)


def load_splits(cfg: DataConfig) -> Splits:
    src = cfg.source
    if src in ("arith", "mult"):
        return _generated(cfg)
    if src == "gsm8k":
        root = data_dir(cfg) / "gsm8k"
        return _from_files(cfg, "gsm8k-jsonl", {"train": root / "train.jsonl", "test": root / "test.jsonl"})
    if src == "prosqa":
        root = data_dir(cfg) / "prosqa"
        return _from_files(cfg, "coconut", {"val": root / "valid.json", "test": root / "test.json"})
    if src in READERS:
        return _from_files(cfg, src, {})
    raise DataError(f"unknown data source '{src}' (choose from arith, mult, gsm8k, prosqa, {', '.join(READERS)})")


def load_source(source: str, split: str, *, n: int = 0, seed: int = 0, steps: int = 3, digits: int = 4,
                data_dir_: str = "", gsm8k_steps: str = "equations", path: str = "") -> list[Record]:
    """One split of one source, for `simcot data` (generators produce exactly `n` rows)."""
    if source in READERS or source == "auto":
        if not path:
            raise DataError(f"source '{source}' reads a file: pass --path")
        return _cap(read_file(path, source, gsm8k_steps), n)
    cfg = DataConfig(source=source, seed=seed, steps=steps, digits=digits, data_dir=data_dir_,
                     gsm8k_steps=gsm8k_steps)
    if source in ("arith", "mult"):
        seeds = {"train": 3 * seed, "val": 3 * seed + 1, "test": 3 * seed + 2}
        if split not in seeds:
            raise DataError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
        n = n or 1000
        if source == "arith":
            return generators.arith_chain(n, steps, seeds[split])
        return generators.multiplication(n, digits, seeds[split])
    cfg.n_train = cfg.n_val = cfg.n_test = 0
    splits = load_splits(cfg)
    return _cap(splits[split], n)
