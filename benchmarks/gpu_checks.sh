#!/usr/bin/env bash
# Every GPU check of the project in one command, for a lent GPU machine (one `run` of the device
# tool, or any CUDA box): the compiled Triton kernels against their references, then the kernel and
# rollout benchmarks. Results go to $OUT (default benchmarks/results/gpu): summary.txt, checks.log and
# the benchmarks' JSON/Markdown (7 files: the device tool brings back at most 8).
#
#   bash benchmarks/gpu_checks.sh            # ~6-8 min on one H200
#   QUICK=1 bash benchmarks/gpu_checks.sh    # smoke run of every step, ~2 min
#
# Needs torch + triton with CUDA (the device image has both) and, for the package itself, nothing
# else: simcot is installed --no-deps, and the kernels import neither deepspeed nor mlflow. Training
# steps on GPU (issue 6) need deepspeed/mlflow/fire/datasets as carried wheels, so they are not here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
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
cp benchmarks/results/*cuda* "$OUT"/ 2>/dev/null
exit $status
