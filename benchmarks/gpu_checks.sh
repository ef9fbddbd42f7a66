#!/usr/bin/env bash
# Every GPU check of the project in one command, for a lent GPU machine (one `run` of the device
# tool, or any CUDA box): the compiled Triton kernels against their references, then the kernel and
# rollout benchmarks. $OUT (default benchmarks/results/gpu) gets three files, as the device tool
# brings back at most 8: summary.txt, checks.log and results.tar.gz (every JSON/Markdown result).
#
#   bash benchmarks/gpu_checks.sh            # ~6-8 min on one H200
#   QUICK=1 bash benchmarks/gpu_checks.sh    # smoke run of every step, ~2 min
#
# Needs torch + triton with CUDA (the device image has both) and, for the package itself, nothing
# else: simcot is installed --no-deps, and the kernels import neither deepspeed nor mlflow.
# TRAIN_STEPS=1 adds bench_train_step.py (every method at llama-3.2-1b full FT and llama-3.1-8b with
# ZeRO-3 + optimizer offload): it needs deepspeed, mlflow, fire and datasets, which the device image
# lacks, so carry them as wheels (the device README says how) and set PYTHONPATH before calling.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
RES=$(mktemp -d)  # every results file, packed into $OUT/results.tar.gz at the end
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
quick=${QUICK:+--quick}
status=0
step() {  # name, command...: run, log to $OUT/checks.log, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/checks.log"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/checks.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"
step install $PY -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/simcot-site .
export PYTHONPATH=/tmp/simcot-site${PYTHONPATH:+:$PYTHONPATH}
step cuda_tests $PY -m pytest -q -p no:cacheprovider --noconftest tests/test_kernel_cuda.py
step linear_cross_entropy $PY benchmarks/bench_linear_cross_entropy.py --device cuda $quick
step latent_feedback $PY benchmarks/bench_latent_feedback.py --device cuda ${QUICK:+--iters 3}
step rollout $PY benchmarks/bench_rollout.py --device cuda $quick
if [ -n "${TRAIN_STEPS:-}" ]; then
    step train_step_1b $PY benchmarks/bench_train_step.py --model llama-3.2-1b --zero 0 ${QUICK:+--steps 2} \
        --out "$RES/train_step_1b.json"
    step train_step_8b $PY benchmarks/bench_train_step.py --model llama-3.1-8b --zero 3 --offload optimizer \
        --micro-batch 2 ${QUICK:+--steps 2} --out "$RES/train_step_8b.json"
fi
cp benchmarks/results/*cuda* "$RES"/ 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$RES" .
exit $status
