#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the lent GPU machine's image lacks, to carry with the tree:
# deepspeed (built here: it is pure Python, its ops compile at run time), mlflow-skinny (what simcot
# imports from mlflow: the client, entities, the SQLite store with sqlalchemy and alembic), fire, and
# their dependencies, as wheels for Python $PYVER (default 3.12, the image's) on manylinux x86_64.
# gpu_checks.sh installs them with `pip install --no-index --no-deps --target`.
#
#   bash benchmarks/make_wheels.sh              # for the GPU image (Python 3.12)
#   PYVER=3.11 bash benchmarks/make_wheels.sh   # for a rehearsal in a local Python 3.11 venv
#
# Not carried: torch, triton, nvidia-* and everything else the image has (IMAGE_HAS below), and
# `datasets`, whose pyarrow (~45 MB) and pandas (~12 MB) alone pass the 64 MiB that may travel with
# the tree; the GPU steps do not need it (bench_train_step.py tokenizes without it). The versions
# follow this machine's venv, so the GPU runs what the tests run. Prints the total size (keep < ~50 MiB).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYVER=${PYVER:-3.12}
PIP=${PIP:-$REPO/.venv/bin/python -m pip}
DEST=${DEST:-$REPO/.whl}  # where the wheels go (the device tool carries .whl)
# What the image (torch 2.11, triton, transformers, peft, pytest, numpy, safetensors, sentencepiece,
# tokenizers) already brings, with their own dependencies: never carried (numpy alone is 16 MB).
IMAGE_HAS="torch triton transformers tokenizers safetensors sentencepiece peft pytest numpy huggingface_hub hf_xet
pyyaml tqdm packaging regex filelock fsspec typing_extensions jinja2 markupsafe sympy mpmath networkx accelerate
psutil pluggy iniconfig pygments"

version() {  # the version in this machine's venv, so the GPU runs what the tests run
    $PIP show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}
DS=$(version deepspeed); MLF=$(version mlflow-skinny); FIRE=$(version fire)
if [ -z "$DS" ] || [ -z "$MLF" ] || [ -z "$FIRE" ]; then
    echo "make_wheels.sh: deepspeed, mlflow-skinny and fire must be installed where $PIP looks (make setup)" >&2
    exit 1
fi

rm -rf "$DEST" && mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "deepspeed $DS (built here), mlflow-skinny $MLF, fire $FIRE, for Python $PYVER"
$PIP wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DS"
# deepspeed's dependencies (but torch), mlflow-skinny's and fire's, the SQLite store's, and a
# setuptools that builds wheels without the `wheel` package, resolved for the target Python.
$PIP download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" \
    "mlflow-skinny==$MLF" "fire==$FIRE" sqlalchemy alembic einops hjson msgpack ninja py-cpuinfo pydantic \
    "setuptools>=70.1"  # builds simcot there (--no-build-isolation) whatever the image's setuptools is
norm() { echo "$1" | tr 'A-Z-.' 'a-z__'; }
for w in "$tmp"/*.whl; do
    name=$(norm "$(basename "$w" | cut -d- -f1)")
    case "$name" in torch | triton | nvidia_*) echo "make_wheels.sh: refusing $w" >&2; exit 1 ;; esac
    skip=
    for have in $IMAGE_HAS; do [ "$name" = "$(norm "$have")" ] && skip=1; done
    [ -n "$skip" ] || mv "$w" "$DEST/"
done
ls "$DEST" | sed 's/^/  /'
echo "$(ls "$DEST" | wc -l) wheels, $(du -sm "$DEST" | cut -f1) MiB in $DEST ($(du -sk "$DEST" | cut -f1) KiB)"
