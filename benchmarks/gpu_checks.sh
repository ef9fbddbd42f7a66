#!/usr/bin/env bash
# Every GPU check of the project, in parts that each fit one `run` of the device tool (<= 8 min
# on one H200) or any CUDA box; benchmarks/README.md "Running the GPU checks" has the exact calls.
#
#   bash benchmarks/gpu_checks.sh kernels   # CUDA kernel tests, fused CE, latent feedback, rollout
#   bash benchmarks/gpu_checks.sh train     # one process: a measured step per method, 1B full FT, 8B LoRA ZeRO-3
#   bash benchmarks/gpu_checks.sh decode    # --eval.compile's decode (CUDA graphs) against the eager one, ~3 min
#   DEVICE=cpu QUICK=1 PYTHON=/path/to/bare/python bash benchmarks/gpu_checks.sh kernels   # the CPU rehearsal
#   bash benchmarks/gpu_checks.sh where     # only install and check which simcot the steps import
#
# Every step prints its estimated time before and its actual time after; its rc goes to summary.txt,
# its output to checks.log, and every results file it wrote to results.tar.gz (with meta.json:
# commit, date, machine), all in $OUT (default .gpu_checks/<part>, git-ignored). Land the numbers with
# `python benchmarks/gpu_results.py results.tar.gz`. The benchmarks' own results folder is not written.
#
# The install is the GPU image's: the wheels in .whl/ (benchmarks/make_wheels.sh: deepspeed, mlflow,
# fire and what they need) and simcot itself go into one --target folder on PYTHONPATH, --no-index.
# No shadowing: every Python process runs in a scratch folder outside the repository (and -m / -c
# with -P), so `import simcot` finds the installed package, never the repo's own simcot/ folder,
# which lacks kernels/, train/... (setup.cfg maps them only on install).
#
# Environment: DEVICE (cuda | cpu), QUICK=1 (tiny shapes), PYTHON, OUT, SITE (the --target folder;
# INSTALL=0 uses it as it is), BUDGET (seconds for the part, default 420 on a GPU, none on CPU),
# SIMCOT_COMMIT (else git, else .whl/COMMIT: the tree travels to a lent GPU without .git).
set -uo pipefail

main() {  # the whole script is read before it runs: editing or checking out the file mid-run is safe
REPO=$(cd "$(dirname "$0")/.." && pwd)
PART=${1:-}
case "$PART" in
    kernels | train | decode | where) ;;
    *) echo "usage: bash benchmarks/gpu_checks.sh kernels|train|decode|where (got '${PART}')" >&2; exit 2 ;;
esac
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
PY=${PYTHON:-python3}
PY=$([[ $PY != */* ]] && echo "$PY" || echo "$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")")  # steps run elsewhere
OUT=${OUT:-$REPO/.gpu_checks/$PART}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/summary.txt" "$OUT/checks.log" "$OUT/results.tar.gz"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/simcot-gpu-checks.XXXXXX")  # every step's working directory
SITE=${SITE:-$WORK/site}
mkdir -p "$SITE" "$WORK/results"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlruns.db
if [ "$DEVICE" = cpu ]; then
    export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu  # before any kernel module is imported
else
    export TRITON_INTERPRET=0
fi
quick=${QUICK:+--quick}
status=0
# The part's wall-clock budget in seconds (0: none): on a GPU it must fit one `run` and the lease.
BUDGET=${BUDGET:-$([ "$DEVICE" = cpu ] && echo 0 || echo 420)}
RESERVE=15  # seconds kept for packing the results

# The benchmarks write their results files into the archive's folder, never into benchmarks/results/
# (whatever else writes there meanwhile, e.g. work beside a rehearsal, is none of this script's).
export SIMCOT_RESULTS_DIR="$WORK/results"

log() { echo "$*" | tee -a "$OUT/summary.txt" "$OUT/checks.log"; }

LIMIT=0  # seconds a step's Python may run (set by step; 0: no limit)
py() {  # the only way a step starts Python: outside the repository; -P for -m and -c
    local run=("$PY")
    [ "$LIMIT" = 0 ] || run=(timeout --kill-after=15 "$LIMIT" "$PY")
    case "${1:-}" in
        -m | -c) (cd "$WORK" && "${run[@]}" -P "$@") ;;
        *) (cd "$WORK" && "${run[@]}" "$@") ;;
    esac
}

step() {  # name, estimated s, limit s (0: none) for its Python, command...: run, log, remember a failure
    local name=$1 est=$2 limit=$3; shift 3
    if [ "$BUDGET" != 0 ]; then  # never past the part's budget: the archive must still be packed
        local left=$((BUDGET - SECONDS - RESERVE))
        if [ "$left" -lt 10 ]; then
            log "== $name: rc=124 in 0 s (estimated ~${est} s): not started, ${BUDGET} s budget spent"
            status=1
            return 124
        fi
        [ "$limit" != 0 ] && [ "$limit" -lt "$left" ] || limit=$left
    fi
    echo "== $name: estimated ~${est} s$([ "$limit" = 0 ] || echo ", limit $limit s"): $*" | tee -a "$OUT/checks.log"
    local t0=$SECONDS
    LIMIT=$limit
    "$@" 2>&1 | tee -a "$OUT/checks.log"
    local rc=${PIPESTATUS[0]}
    LIMIT=0
    log "== $name: rc=$rc in $((SECONDS - t0)) s (estimated ~${est} s)"
    [ "$rc" = 0 ] || status=1
    return "$rc"
}

est() {  # seconds: the GPU estimate ($1, unmeasured until a lease), or the CPU rehearsal's ($2)
    if [ "$DEVICE" = cpu ]; then echo "$2"; else echo "$1"; fi
}
lim() {  # a hard limit on the GPU, so one hung step cannot eat the part; none on a loaded CPU
    if [ "$DEVICE" = cpu ]; then echo 0; else echo "$1"; fi
}

check_imports() {  # the installed simcot (and the modules this part needs) and nothing else
    py -c "
import sys, simcot
where = simcot.__file__
print('simcot from', where)
if not where.startswith('$SITE/'):
    sys.exit(f'simcot resolves to {where}, not the installed copy under $SITE: the repo folder shadows it')
import importlib
for name in sys.argv[1:]:
    mod = importlib.import_module(name)
    print(name, getattr(mod, '__version__', ''), getattr(mod, '__file__', ''))
" "$@"
}

write_meta() {  # commit, date, machine and versions of this run, for gpu_results.py
    local commit
    commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || cat "$REPO/.whl/COMMIT" 2>/dev/null || echo unknown)
    commit=${SIMCOT_COMMIT:-$commit}
    py -c "
import json, sys
sys.path.insert(0, '$REPO/benchmarks')
from results_io import machine_meta
meta = machine_meta('$DEVICE', command='bash benchmarks/gpu_checks.sh $PART')
if meta['commit'] == 'unknown':
    meta['commit'] = '$commit'
meta.update(part='$PART', quick=bool('$QUICK'))
for pkg in ('triton', 'transformers', 'deepspeed'):
    try:
        meta[pkg] = __import__(pkg).__version__
    except Exception as e:
        meta[pkg] = f'absent ({type(e).__name__})'
json.dump(meta, open('$WORK/results/meta.json', 'w'), indent=1)
print(json.dumps(meta))
"
}

collect() {  # the results files the steps wrote -> the archive
    tar czf "$OUT/results.tar.gz" -C "$WORK/results" .
    log "== results: $(tar tzf "$OUT/results.tar.gz" | grep -v '/$' | tr '\n' ' ')"
}

log "== gpu_checks $PART: device $DEVICE${QUICK:+, quick}, python $PY, $(date -u '+%Y-%m-%d %H:%M UTC')"
if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
fi

if [ "${INSTALL:-1}" = 1 ]; then
    shopt -s nullglob
    wheels=("$REPO"/.whl/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -gt 0 ]; then
        printf '%s\n' "${wheels[@]}" > "$WORK/wheels.txt"  # ${#wheels[@]} of them: one line in the log
        step wheels "$(est 30 20)" "$(lim 120)" py -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --disable-pip-version-check --target "$SITE" -r "$WORK/wheels.txt"
    else
        log "== wheels: none in .whl/ (benchmarks/make_wheels.sh makes them); the train part needs deepspeed"
    fi
    # Built from a copy: no build/ or egg-info left in the tree, no stale build/lib file installed.
    # --no-build-isolation: the build's setuptools comes from the image or the wheels, not the index.
    mkdir -p "$WORK/src"
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./.whl --exclude=./.gpu_checks --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=./tests --exclude=./benchmarks --exclude=./shared \
        -cf - . | tar -C "$WORK/src" -xf -
    step install "$(est 20 40)" "$(lim 120)" py -m pip install -q --no-index --no-deps --no-build-isolation \
        --no-cache-dir --disable-pip-version-check --target "$SITE" "$WORK/src"
fi

case "$PART" in
    where)  # the import path of every kind of step: `-c`, and pytest collecting the CUDA tests
        step imports 5 0 check_imports
        step collect 10 0 py -m pytest --collect-only -q -s -p no:cacheprovider --noconftest \
            "$REPO/tests/test_kernel_cuda.py"
        ;;
    kernels)
        step imports "$(est 15 30)" "$(lim 60)" check_imports torch triton simcot.kernels simcot.models.rollout
        write_meta  # even after a failed import: the archive says where and what ran
        step cuda_tests "$(est 90 30)" "$(lim 180)" py -m pytest -q -rs -p no:cacheprovider --noconftest \
            "$REPO/tests/test_kernel_cuda.py"
        # the open-ended benchmark last: it gets what the budget leaves, the others surely finish
        step latent_feedback "$(est 30 90)" "$(lim 90)" py "$REPO/benchmarks/bench_latent_feedback.py" \
            --device "$DEVICE" ${QUICK:+--iters 3}
        step rollout "$(est 60 420)" "$(lim 120)" py "$REPO/benchmarks/bench_rollout.py" --device "$DEVICE" $quick \
            --eval-models tiny  # the budget: the Llama alone, as the estimate was made
        step linear_cross_entropy "$(est 150 200)" "$(lim 240)" py "$REPO/benchmarks/bench_linear_cross_entropy.py" \
            --device "$DEVICE" $quick
        ;;
    train)
        step imports "$(est 20 40)" "$(lim 60)" check_imports torch deepspeed simcot.train.runner \
            simcot.launchers.plan peft mlflow fire
        write_meta
        if [ -n "$QUICK" ]; then
            setups=tiny-full,tiny-lora-zero3 budgets=0  # every method, however loaded the machine
        else
            setups=1b-full,8b-lora-zero3 budgets=120,200  # the 8B builds take longer: it gets more
        fi
        step train_step "$(est 340 600)" "$(lim 400)" py "$REPO/benchmarks/bench_train_step.py" --device "$DEVICE" \
            --setups "$setups" --setup-budget-s "$budgets" ${QUICK:+--warmup 1} $quick
        ;;
    decode)  # the compiled decode (static shapes, CUDA graphs on a GPU) beside the eager one, both tiny models
        step imports "$(est 15 30)" "$(lim 60)" check_imports torch simcot.models.rollout simcot.models.decoding
        write_meta
        step rollout_compiled "$(est 180 240)" "$(lim 300)" py "$REPO/benchmarks/bench_rollout.py" \
            --device "$DEVICE" $quick --compiled --new-tokens 32 --rounds 3 --results-base rollout_compiled \
            $([ "$DEVICE" = cpu ] && echo --static)  # the rehearsal decodes as the GPU will, without CUDA graphs
        ;;
esac

[ "$PART" = where ] || collect  # `where` writes no results (and may run beside a rehearsal)
log "== gpu_checks $PART: $([ $status = 0 ] && echo 'every step rc=0' || echo 'FAILED steps above') in $SECONDS s"
rm -rf "$WORK"
exit $status
}

main "$@"
