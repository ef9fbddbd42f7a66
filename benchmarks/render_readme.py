"""Rewrite the README blocks that show results files; ``--check`` only compares.

A block is ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``; its body is
``benchmarks/results/NAME.md`` verbatim (NAME may hold a sub-folder: ``sweep_toy_cpu/results``).
No figure in a README is typed by hand: change the results file (re-run its benchmark) and render.

    python benchmarks/render_readme.py          # rewrite README.md and benchmarks/README.md
    python benchmarks/render_readme.py --check  # exit 1 and name every stale block
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
READMES = (REPO / "README.md", REPO / "benchmarks" / "README.md")
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def render(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """(text with every block refreshed, names of the blocks whose body changed)."""
    changed: list[str] = []

    def body(m: re.Match) -> str:
        src = results / f"{m['name']}.md"
        if not src.is_file():
            raise FileNotFoundError(f"README block results:{m['name']} has no results file {src}")
        new = src.read_text().rstrip("\n") + "\n"
        if new != m["body"]:
            changed.append(m["name"])
        return m.group(1) + new + m.group(4)

    return BLOCK.sub(body, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a block is stale")
    args = ap.parse_args(argv)
    stale = []
    for readme in READMES:
        text = readme.read_text()
        new, changed = render(text)
        stale += [f"{readme.relative_to(REPO)}: results:{n}" for n in changed]
        if changed and not args.check:
            readme.write_text(new)
    for s in stale:
        print(("stale " if args.check else "rendered ") + s)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
