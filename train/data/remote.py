"""Data that is not on this machine yet: Hugging Face Hub data sets and files behind URLs.

Both are cached (the Hub's own `datasets` cache; a folder of fetched files), so a second run, or
a run with ``HF_DATASETS_OFFLINE=1``, reads what the first one fetched. When nothing can be
reached, the caller turns :class:`Unreachable` into one line naming everything it tried.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from pathlib import Path


class Unreachable(RuntimeError):
    """The Hub data set or the URL could not be read; the message is one short cause."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def hub_dataset(repo: str, config: str | None = None):
    """`datasets.load_dataset(repo, config)` as a DatasetDict (a local dataset folder works too)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(repo, config) if config else datasets.load_dataset(repo)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # the Hub client raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = datasets.config.HF_DATASETS_OFFLINE
        offline = " (HF_DATASETS_OFFLINE is set and it is not in the cache)" if offline else ""
        raise Unreachable(f"{type(e).__name__}: {_one_line(e)}{offline}") from None


def is_url(path: str) -> bool:
    return urllib.parse.urlparse(str(path)).scheme in ("http", "https", "file")


def cache_folder() -> Path:
    """Where fetched files are kept: $SIMCOT_CACHE, else ~/.cache/simcot/data."""
    if os.environ.get("SIMCOT_CACHE"):
        return Path(os.environ["SIMCOT_CACHE"])
    return Path.home() / ".cache" / "simcot" / "data"


def fetch(url: str, folder: Path | None = None, timeout: float = 60.0) -> Path:
    """The local copy of `url`, downloaded once with urllib into the cache folder."""
    folder = Path(folder) if folder else cache_folder()
    name = Path(urllib.parse.urlparse(url).path).name or "data"
    # the URL's hash keeps two files of the same name (prosqa_test.json of two forks) apart
    path = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, tmp.open("wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        tmp.replace(path)  # a half-fetched file never becomes the cached copy
    except (KeyboardInterrupt, MemoryError):
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # URLError, HTTPError, timeouts, OSError
        tmp.unlink(missing_ok=True)
        raise Unreachable(f"cannot fetch {url}: {_one_line(e)}") from None
    return path
