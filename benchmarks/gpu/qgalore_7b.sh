#!/usr/bin/env bash
# The GPU part of "Full-parameter 7B training in under 16 GB" (Q-GaLore + optimizer state on the host): measured
# peak of Llama-2-7B steps next to the planner's, with and without offload, and the INT8 Triton matmul. One H100,
# under 8 minutes:
#
#   bash benchmarks/gpu/qgalore_7b.sh          # writes benchmarks/results/qgalore_7b_cuda.{md,json}
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 450 $PY benchmarks/gpu/qgalore_7b.py --seq 2048 --steps 4
