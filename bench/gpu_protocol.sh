#!/usr/bin/env bash
# The GPU protocol of bench/RESULTS.md in one command, on a machine with an NVIDIA GPU and torch
# with CUDA: the gpu-marked tests, then every throughput and out-of-memory figure. Results go to
# the folder given (default gpu-results/): paste throughput.md into bench/RESULTS.md.
set -euo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
python -m pytest -m gpu -q tests 2>&1 | tee "$out/gpu-tests.txt"
python bench/gpu_throughput.py 2>&1 | tee "$out/throughput.md"
