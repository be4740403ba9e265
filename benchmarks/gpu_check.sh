#!/usr/bin/env bash
# GPU check of stage 2 (bf16 FSDP2 steps of the unified LM, ~1B LLaMA-shaped config, flash/SDPA
# attention): prints step time, tokens/s and MFU. Needs a CUDA machine with the project installed;
# one process per visible GPU. Extra arguments go to benchmarks/gpu_check.py (e.g. --seq 8192).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
if [ "${GPU_CHECK_CPU_SMOKE:-0}" = 1 ]; then GPUS=1; fi  # script check without a GPU (tiny shapes)
if [ "$GPUS" -lt 1 ]; then  # no GPU: set GPU_CHECK_CPU_SMOKE=1 to check the script itself
  echo "gpu_check: no CUDA device visible" >&2
  exit 1
fi
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} $PYTHON -m torch.distributed.run --standalone --nproc_per_node "$GPUS" \
  benchmarks/gpu_check.py "$@"
