#!/usr/bin/env bash
# The GPU-ready check (issue 13 item 6): CUDA capture in bf16 vs the bare forward, the trainer in bf16
# autocast with NCCL under torchrun, the data plane into pinned buffers. Under 10 minutes on one GPU;
# on a CPU machine each part prints a SKIP line and the script exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout "${GPU_CHECK_TIMEOUT_S:-600}" "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
