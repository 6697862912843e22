#!/usr/bin/env bash
# The GPU protocol of bench/RESULTS.md in one command, on a machine with an NVIDIA GPU and torch
# with CUDA, in about 12 minutes: a preflight (driver, CUDA, compute and MIG modes, NVML's and
# CUDA's device orders, a CUDA context's size, per-process memory in this container), the
# gpu-marked tests, then the throughput and out-of-memory figures on GPU 0. Every step runs,
# each within its own time limit, whatever the steps before it did; the last lines say how each
# ended. Results go to the folder given (default gpu-results/): paste the throughput-*.md
# tables into bench/RESULTS.md.
#
#   bench/gpu_protocol.sh [folder]        # PYTHON=... to use another interpreter than .venv's
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3)
mkdir -p "$out"
summary=()
failed=0

# step NAME SECONDS COMMAND...: run it with its output in $out/NAME, cut off after SECONDS.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name" 2>&1
    local rc=$?
    tail -n 5 "$out/$name"
    local how="exit $rc"
    [ "$rc" -eq 0 ] && how="ok"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="cut off at ${limit}s"
    [ "$rc" -ne 0 ] && failed=1
    summary+=("$name: $how in $((SECONDS - start))s")
}

step preflight.md 90 "$py" bench/gpu_preflight.py
if command -v nvidia-smi >/dev/null; then
    step nvidia-smi.txt 20 nvidia-smi
fi
step gpu-tests.txt 240 "$py" -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py
step throughput-small.md 210 "$py" bench/gpu_throughput.py --only fresh small \
    --fresh-trials 4 --small-trials 24 --packing 1 4 16 auto
step throughput-large.md 120 "$py" bench/gpu_throughput.py --only large \
    --large-trials 8 --packing 1 4 auto
step throughput-oom.md 60 "$py" bench/gpu_throughput.py --only oom --oom-trials 4

echo
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$failed"
