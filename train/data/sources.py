"""From a :class:`DataConfig` to train/val/test splits of records (``datasets.Dataset``).

Sources:
- ``arith``, ``mult``: generated; the three splits use disjoint seeds and the validation and
  test problems never appear in training (exact duplicates are removed).
- named public data sets (:data:`NAMED`): ``gsm8k``, ``gsm8k-aug``, ``gsm8k-aug-nl``, ``multiarith``,
  ``svamp`` (Hugging Face Hub), ``prosqa`` (Coconut's JSON files on GitHub), ``prontoqa`` (files
  made by Coconut's script). Each split comes from, in order: ``data.{train,val,test}_file``
  (a path or a URL); ``<dir>/<name>/{train,valid|validation,test}.{jsonl,json,txt}`` in the first
  of data.data_dir, $SIMCOT_DATA_DIR, ../shared/data that has the folder; then the Hub through
  ``datasets.load_dataset`` (its cache; ``HF_DATASETS_OFFLINE``) or the release's URLs. A data set
  without a validation split gets a seeded hold-out of train.
- a file format (``jsonl``, ``gsm8k-jsonl``, ``aug``, ``icot``, ``coconut``): the splits come
  from ``train_file``/``val_file``/``test_file``; a missing validation file is held out of train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from simcot.train.config import DataConfig
from simcot.train.data.formats import READERS, DataError, Record, read_file
from simcot.train.data import formats
from simcot.train.data import generators
from simcot.train.data import remote

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def data_dirs(cfg: DataConfig) -> list[Path]:
    """Local data folders in the order they are searched: data.data_dir, $SIMCOT_DATA_DIR, then
    ../shared/data beside the working directory and beside the repository."""
    dirs = [Path(cfg.data_dir)] if cfg.data_dir else []
    if os.environ.get("SIMCOT_DATA_DIR"):
        dirs.append(Path(os.environ["SIMCOT_DATA_DIR"]))
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = base.parent / "shared" / "data"
        if cand not in dirs:
            dirs.append(cand)
    return dirs


def data_dir(cfg: DataConfig) -> Path:
    """The first local data folder that exists (else the first one searched)."""
    dirs = data_dirs(cfg)
    return next((d for d in dirs if d.is_dir()), dirs[0])


@dataclass
class Splits:
    train: list[Record]
    val: list[Record]
    test: list[Record]
    source: str
    origin: dict[str, str] = field(default_factory=dict)  # split -> where its rows came from (logged)

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


def generate(cfg: DataConfig, n: int, seed: int) -> list[Record]:
    """`n` rows of a generated source (arith, mult) as `cfg` sets it up."""
    if cfg.source == "arith":
        return generators.arith_chain(n, cfg.steps, seed, min_steps=cfg.min_steps,
                                      max_operand=cfg.max_operand, max_value=cfg.max_value)
    return generators.multiplication(n, cfg.digits, seed)


def _generated(cfg: DataConfig) -> Splits:
    # Evaluation splits first, then training rows that collide with them are dropped, so a
    # memorising model cannot score on the held-out splits.
    test = generate(cfg, cfg.n_test, 3 * cfg.seed + 2)
    val = generate(cfg, cfg.n_val, 3 * cfg.seed + 1)
    seen = {r["question"] for r in test + val}
    train = [r for r in generate(cfg, int(cfg.n_train * 1.25) + 16, 3 * cfg.seed) if r["question"] not in seen]
    return Splits(train[: cfg.n_train], val, test, cfg.source)


def _local(path: str | Path) -> Path:
    """A data file by path, or by URL (fetched once into the cache folder)."""
    if not remote.is_url(str(path)):
        return Path(path)
    try:
        return remote.fetch(str(path))
    except remote.Unreachable as e:
        raise DataError(str(e)) from None


def _assemble(cfg: DataConfig, loaded: dict[str, list[Record]], origin: dict[str, str] | None = None) -> Splits:
    if not loaded["train"]:
        raise DataError(f"source '{cfg.source}' has no training split here: set data.train_file")
    origin = {s: o for s, o in (origin or {}).items() if loaded[s]}
    train, val = loaded["train"], loaded["val"]
    if not val:
        train, val = _hold_out(train, cfg.n_val, cfg.seed)
        if val and "train" in origin:
            origin["val"] = f"held out of {origin['train']}"
    return Splits(_cap(train, cfg.n_train), _cap(val, cfg.n_val), _cap(loaded["test"], cfg.n_test), cfg.source,
                  origin)


def _explicit_files(cfg: DataConfig) -> dict[str, str]:
    return {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}


def _from_files(cfg: DataConfig, fmt: str, defaults: dict[str, Path | None]) -> Splits:
    files = _explicit_files(cfg)
    loaded: dict[str, list[Record]] = {}
    for split in SPLITS:
        path = _local(files[split]) if files[split] else defaults.get(split)
        if path is None:
            loaded[split] = []
            continue
        # A user's file given for a named data set (gsm8k, prosqa) may be in any format.
        f = "auto" if files[split] and cfg.source not in READERS else fmt
        loaded[split] = read_file(path, f, gsm8k_steps=cfg.gsm8k_steps)
    return _assemble(cfg, loaded, {s: files[s] for s in SPLITS if files[s]})


# ------------------------------------------------------------------------- named data sets


@dataclass(frozen=True)
class Named:
    """A public data set: its folder in a local data directory, then (if any) its Hub id."""

    folder: str
    row: Callable[[object, str, DataConfig], Record]  # one row of the release -> record
    hub: str = ""  # Hugging Face dataset id
    hub_config: str | None = None
    urls: tuple[str, str, str] = ("", "", "")  # (train, val, test) files elsewhere, e.g. on GitHub


# Pinned to a commit: the files behind a URL are cached by URL, so they must not change under it.
_COCONUT = "https://raw.githubusercontent.com/facebookresearch/coconut/27273cb8cca4bb763c041a63b036d0c3b7cbbb48/data/"

NAMED: dict[str, Named] = {
    "gsm8k": Named("gsm8k", lambda o, w, c: formats.gsm8k_row(o, w, c.gsm8k_steps), "openai/gsm8k", "main"),
    "gsm8k-aug": Named("gsm8k-aug", lambda o, w, c: formats.gsm8k_aug_row(o, w), "zen-E/GSM8k-Aug"),
    "gsm8k-aug-nl": Named("gsm8k-aug-nl", lambda o, w, c: formats.gsm8k_aug_nl_row(o, w), "zen-E/GSM8k-Aug-NL"),
    "multiarith": Named("multiarith", lambda o, w, c: formats.multiarith_row(o, w), "ChilleD/MultiArith"),
    "svamp": Named("svamp", lambda o, w, c: formats.svamp_row(o, w), "ChilleD/SVAMP"),
    "prosqa": Named("prosqa", lambda o, w, c: formats.check_record(o, w),
                    urls=tuple(f"{_COCONUT}prosqa_{s}.json" for s in ("train", "valid", "test"))),
    "prontoqa": Named("prontoqa", lambda o, w, c: formats.check_record(o, w)),  # made by Coconut's script
}

# File names of each split in a local copy, and split names of a Hub data set, first match wins.
_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
_SUFFIXES = (".jsonl", ".json", ".txt")


def _split_file(folder: Path, split: str) -> Path | None:
    for name in _SPLIT_NAMES[split]:
        for suffix in _SUFFIXES:
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
    return None


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a .json list or a .jsonl file, for the release's own row parser."""
    first = next((line for _, line in formats.utf8_lines(path) if line.strip()), "")
    if path.suffix == ".json" and first.lstrip().startswith("["):
        return formats.json_list(path, lambda obj, where: (where, obj))
    return ((f"{path}:{i}", obj) for i, obj in formats.json_lines(path))


def _read_release_file(path: Path, named: Named, cfg: DataConfig) -> list[Record]:
    """A file of a named data set: the release's rows (e.g. the Hub's fields as jsonl), simcot's own
    {question, steps, answer} rows, the SemCoT release's rows, or a text format (aug/icot lines)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    first = next((line for _, line in formats.utf8_lines(path) if line.strip()), "").lstrip()
    if not first.startswith(("{", "[")):
        return read_file(path, "auto")

    def parse(obj: object, where: str) -> Record | None:
        if isinstance(obj, dict) and "steps" in obj:
            return formats.check_record(obj, where)
        if isinstance(obj, dict) and "query" in obj and "reasoning" in obj:  # the SemCoT release's files
            return formats.semcot_row(obj, where)
        return named.row(obj, where, cfg)

    return _kept([(where, parse(obj, where)) for where, obj in _rows(path)])


def _kept(parsed: list[tuple[str, Record | None]]) -> list[Record]:
    """The records, without the rows a release marks unusable (None), which are logged once."""
    dropped = [where for where, rec in parsed if rec is None]
    if dropped:
        log.warning("dropped %d rows the release leaves without an answer (first: %s)", len(dropped), dropped[0])
    return [rec for _, rec in parsed if rec is not None]


def _hub_records(named: Named, cfg: DataConfig) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """The records of each split and the Hub's name of that split."""
    repo = cfg.hub_id or named.hub
    ds = remote.hub_dataset(repo, named.hub_config)
    loaded, names = {}, {}
    for split in SPLITS:
        name = names[split] = next((n for n in _SPLIT_NAMES[split] if n in ds), "")
        if not name:
            loaded[split] = []
            continue
        rows = ds[name].to_list()
        wheres = (f"{repo}[{name}]:row {i}" for i in range(len(rows)))
        loaded[split] = _kept([(w, named.row(obj, w, cfg)) for w, obj in zip(wheres, rows)])
    return loaded, names


def _named(cfg: DataConfig, named: Named) -> Splits:
    """Each split from, in order: its explicit file (path or URL); the data set's folder in the first
    data directory that has it; the Hugging Face Hub (through `datasets`' cache), or the release's URLs."""
    explicit = _explicit_files(cfg)
    loaded: dict[str, list[Record]] = {}
    origin = {s: explicit[s] for s in SPLITS if explicit[s]}
    for split in origin:
        loaded[split] = _read_release_file(_local(explicit[split]), named, cfg)
    missing = [s for s in SPLITS if s not in loaded]
    if not missing:
        return _assemble(cfg, loaded, origin)
    folders = [d / named.folder for d in data_dirs(cfg)]
    folder = next((f for f in folders if any(_split_file(f, s) for s in SPLITS)), None)
    if folder is not None:  # a local copy is a whole release: a split it lacks is not looked up elsewhere
        for split in missing:
            path = _split_file(folder, split)
            loaded[split] = _read_release_file(path, named, cfg) if path else []
            origin[split] = str(path)
        return _assemble(cfg, loaded, origin)
    tried = [f"{f}/" for f in folders]
    try:
        if named.hub or cfg.hub_id:
            tried.append(f"Hub dataset {cfg.hub_id or named.hub}")
            hub, names = _hub_records(named, cfg)
            loaded.update({s: hub[s] for s in missing})
            origin.update({s: f"{cfg.hub_id or named.hub}[{names[s]}]" for s in missing})
        elif any(named.urls):
            urls = dict(zip(SPLITS, named.urls))
            tried.append(" ".join(urls[s] for s in missing if urls[s]))
            for split in missing:
                loaded[split] = _read_release_file(remote.fetch(urls[split]), named, cfg) if urls[split] else []
                origin[split] = urls[split]
        elif loaded:  # the user's own files; the splits they left out are empty (validation: held out)
            loaded.update({s: [] for s in missing})
        else:
            raise remote.Unreachable("no download location; pass data.train_file/val_file/test_file (paths or URLs)")
    except remote.Unreachable as e:
        places = ", ".join(tried)
        raise DataError(f"source '{cfg.source}': none of its places is reachable (tried {places}): {e}") from None
    return _assemble(cfg, loaded, origin)


def load_splits(cfg: DataConfig) -> Splits:
    src = cfg.source
    if src in ("arith", "mult"):
        return _generated(cfg)
    if src in NAMED:
        return _named(cfg, NAMED[src])
    if src in READERS:
        return _from_files(cfg, src, {})
    raise DataError(f"unknown data source '{src}' (choose from arith, mult, {', '.join(NAMED)}, {', '.join(READERS)})")


def load_source(cfg: DataConfig, split: str, n: int = 0, path: str = "") -> list[Record]:
    """One split of `cfg`'s source, for `simcot data`: `n` generated rows (default 1000), or a cap on
    the split (0 = all); a file format reads `path`. A generator makes the rows a run with `cfg`
    makes (the same settings and seeds)."""
    source = cfg.source
    if source in READERS or source == "auto":
        if not path:
            raise DataError(f"source '{source}' reads a file: pass --path")
        return _cap(read_file(path, source, cfg.gsm8k_steps), n)
    if source in ("arith", "mult"):
        seeds = {"train": 3 * cfg.seed, "val": 3 * cfg.seed + 1, "test": 3 * cfg.seed + 2}
        if split not in seeds:
            raise DataError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
        return generate(cfg, n or 1000, seeds[split])  # the run's rows (its train split also drops test/val questions)
    cfg = replace(cfg, n_train=0, n_val=0, n_test=0)
    splits = load_splits(cfg)
    return _cap(splits[split], n)
