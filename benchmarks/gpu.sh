#!/usr/bin/env bash
# The GPU checks quoted in the README, run on a machine with one CUDA GPU from the repository root:
#   bash benchmarks/gpu.sh [OUTDIR]
# 1. generation speed with and without the key/value cache on the GPU (one sequence and large batches),
# 2. the same benchmark on that machine's CPU (1 thread), to compare with the README's CPU figures,
# 3. solver memory and time on the GPU at the paper's width (768, 12 heads).
# Each step has a time limit so one slow step cannot take the others with it; outputs go to OUTDIR.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, platform; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| python', platform.python_version(), '|', torch.cuda.get_device_name(0))"
timeout 240 python3 benchmarks/generation.py --device cuda --threads 0 --batch-sizes 1 64 256 --repeats 2 \
    --ppl-train-steps 0 2>&1 | tee "$out/generation-cuda.txt"
timeout 150 python3 benchmarks/generation.py --device cpu --threads 1 --batch-sizes 1 --repeats 2 \
    --ppl-train-steps 0 2>&1 | tee "$out/generation-gpu-host-cpu.txt"
timeout 120 python3 benchmarks/solver_memory.py --device cuda --width 768 --heads 12 --check 2>&1 \
    | tee "$out/solver-memory-cuda.txt"
