"""Post-install check: the torch build that was asked for, and no stray CUDA wheels.

An unpinned ``torch`` (or a package that asks for a newer one) silently pulls several GB of
``nvidia-*`` wheels onto a CPU machine; this fails the set-up loudly instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--allow-nvidia", default="0", help="1 on GPU machines whose torch build needs nvidia-* wheels")
    p.add_argument("--torch-spec", default="", help="the pip spec torch was installed from, e.g. torch==2.13.0")
    args = p.parse_args(argv)
    names = sorted({(d.metadata["Name"] or "").lower() for d in md.distributions()})
    nvidia = [n for n in names if n.startswith("nvidia-")]
    torch_version = md.version("torch")
    print(f"torch {torch_version}; {len(names)} packages installed")
    pinned = args.torch_spec.partition("==")[2].strip()
    if pinned and torch_version.split("+")[0] != pinned.split("+")[0]:
        print(f"error: torch {torch_version} is installed, but the set-up asked for {args.torch_spec} (replaced by a later "
              f"package? remove .venv and run make setup again)", file=sys.stderr)
        return 1
    if nvidia and args.allow_nvidia not in ("1", "true", "yes"):
        print(f"error: CUDA wheels were installed: {', '.join(nvidia)}. Something resolved an unpinned torch; "
              f"install torch first (make setup TORCH_SPEC=...) or pass ALLOW_NVIDIA=1 on a GPU machine.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
