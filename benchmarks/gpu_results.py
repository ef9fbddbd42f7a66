"""Land a GPU lease's numbers: unpack the results.tar.gz of `gpu_checks.sh` into results files and
render the READMEs, so no figure is typed by hand.

    python benchmarks/gpu_results.py /work/.device/.../results.tar.gz     # into benchmarks/results/
    python benchmarks/gpu_results.py ARCHIVE --results-dir D --readme R   # elsewhere (tests, a dry run)

Each benchmark result in the archive (``<base>_<device>[_quick].json`` and its ``.md``) becomes
``<base>_<device>[_quick].{json,md}`` written by ``results_io.write_results``: a file that already
has a ``meta`` block keeps it, one without gets the archive's ``meta.json`` (commit, date, GPU,
versions, recorded by gpu_checks.sh on that machine); the table under the provenance line is the
benchmark's own. Then every ``<!-- results:NAME -->`` block of the READMEs is re-rendered, and the
names that no README shows yet are printed with the two marker lines to paste where they belong
(README.md "Measured", benchmarks/README.md): a block is added once its results file exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from render_readme import READMES, RESULTS, render  # noqa: E402
from results_io import write_results  # noqa: E402

SUFFIX = re.compile(r"_(cuda|cpu)(_quick)?$")


def land(archive: Path, results_dir: Path) -> list[str]:
    """Write every result of `archive` into `results_dir`; returns the names written."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        root = Path(tmp)
        if not (root / "meta.json").is_file():
            raise SystemExit(f"{archive}: no meta.json (not an archive of benchmarks/gpu_checks.sh)")
        run_meta = json.loads((root / "meta.json").read_text())
        device = "cuda" if run_meta.get("device", "").startswith("cuda") else "cpu"
        names = []
        for src in sorted(root.glob("*.json")):
            if src.name == "meta.json":
                continue
            m = SUFFIX.search(src.stem)
            base = SUFFIX.sub("", src.stem)
            name = f"{base}_{device}{'_quick' if run_meta.get('quick') or (m and m[2]) else ''}"
            data = json.loads(src.read_text())
            md_src = src.with_suffix(".md")
            md = md_src.read_text() if md_src.is_file() else f"(no table: see `{name}.json`)\n"
            meta = data.pop("meta", None) if isinstance(data, dict) else None
            if meta is not None:
                md = md.split("\n", 2)[2] if md.startswith("Measured ") else md  # its provenance line goes anew
                if meta.get("commit", "unknown") == "unknown":
                    meta["commit"], meta["dirty"] = run_meta["commit"], run_meta.get("dirty", False)
            else:
                meta = dict(run_meta, command=run_meta["command"] + f" ({src.stem})")
            if not isinstance(data, dict):
                data = {"rows": data}
            write_results(name, data, md, device=device, meta=meta, results_dir=results_dir)
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", type=Path, help="results.tar.gz from gpu_checks.sh")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, action="append", help="README(s) to render (default: both)")
    args = ap.parse_args(argv)
    if not args.archive.is_file():
        print(f"gpu_results.py: no archive {args.archive}", file=sys.stderr)
        return 1
    names = land(args.archive, args.results_dir)
    shown = set()
    for readme in args.readme or READMES:
        text = readme.read_text()
        new, changed = render(text, args.results_dir)
        shown |= {n for n in names if f"<!-- results:{n} -->" in text}
        if changed:
            readme.write_text(new)
        for n in changed:
            print(f"rendered {readme}: results:{n}")
    for n in names:
        print(f"wrote {args.results_dir / n}.json and .md")
    for n in [n for n in names if n not in shown]:
        print(f"no README shows {n} yet: paste where it belongs, then run this again\n"
              f"  <!-- results:{n} -->\n  <!-- /results:{n} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
