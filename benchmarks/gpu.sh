#!/usr/bin/env bash
# Everything GPU-related in one command, one report file (issue 16):
#
#   benchmarks/gpu.sh [REPORT]                   # on an NVIDIA GPU machine, under 8 minutes
#   SAEKIT_GPU_SMOKE=1 benchmarks/gpu.sh REPORT  # tiny sizes on any machine (make gpu-smoke)
#
# Uses the machine's own python3 and PyTorch (PYTHON=... to choose another) with saekit from
# src/ on PYTHONPATH; installs nothing. Parts that need CUDA, Triton or 2 GPUs are reported as
# skipped when those are missing. Exit status 1 if a section failed.
set -u
cd "$(dirname "$0")/.."
REPORT="${1:-runs/gpu_report.md}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=()
if [ -n "${SAEKIT_GPU_SMOKE:-}" ]; then SMOKE=(--smoke); fi
# The sections stop starting new work after 420 s; the hard limit leaves room to finish one.
timeout 470 "$PY" benchmarks/gpu_bench.py --report "$REPORT" --budget 420 "${SMOKE[@]}"
status=$?
echo "report: $REPORT (exit $status)"
exit $status
