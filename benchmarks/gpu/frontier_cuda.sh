#!/usr/bin/env bash
# The GPU part of "Memory you can dial": the activation frontier on CUDA, measured peaks next to the planner's.
# One script, under 8 minutes on one H100 (bf16, Llama and a Qwen2-style GQA model, seq 2048, batch 1, 3 rounds):
#
#   bash benchmarks/gpu/frontier_cuda.sh            # writes benchmarks/results/frontier_cuda.{md,json,png}
#
# Adds what the CPU run cannot show: transformers' offload=True (pinned host memory, same stream) against leantune's
# offload mode (side stream, prefetch), torch.cuda.max_memory_allocated per variant, and the plan's bytes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 450 $PY benchmarks/frontier.py --device cuda --models llama qwen2 --dtypes bf16 --seqs 2048 --long-seq 0 \
    --batch 1 --rounds 3 --vocab 32000 --out benchmarks/results/frontier_cuda
