#!/usr/bin/env bash
# The GPU checks, run on a machine with one CUDA GPU from the repository root (under 8 minutes on one H100-class
# GPU; every step has a time limit so one slow step cannot take the others with it):
#   bash benchmarks/gpu.sh [OUTDIR]
#   bash benchmarks/gpu.sh --smoke [OUTDIR]    # the same steps on the CPU at the tiny width, in under 3 minutes
# 1. training speed and memory at the paper's size, bf16, ~50 steps each: both recipes, the unrolled gradient
#    and a 12-layer explicit transformer of the same width (train_speed.py; one table),
# 2. generation speed with and without the key/value cache on the GPU (one sequence and large batches),
# 3. the same benchmark on that machine's CPU (1 thread), to compare with the CPU figures in docs/performance.md,
# 4. solver memory and time on the GPU at the paper's width (768, 12 heads).
# Outputs go to OUTDIR (default benchmarks/results); the first lines name the GPU.
set -u
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the interpreter revdeq is installed in
status=0
step() {  # step SECONDS FILE COMMAND...: run under a time limit, keep going on failure, remember it
    local limit=$1 file=$2; shift 2
    timeout "$limit" "$@" 2>&1 | tee "$out/$file" || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu.sh: step failed: $*" >&2; status=1; }
}
if [ "$smoke" = 1 ]; then
    "$py" -c "import torch, platform; print('smoke run on the CPU | torch', torch.__version__, '|', \
platform.processor() or platform.machine())"
    step 90 train-speed-smoke.txt "$py" benchmarks/train_speed.py --smoke
    step 60 generation-smoke.txt "$py" benchmarks/generation.py --device cpu --threads 1 --batch-sizes 1 \
        --repeats 1 --new 8 --prompt 8 --vocab-sizes 257 --ppl-train-steps 0 --no-check
    step 60 solver-memory-smoke.txt "$py" benchmarks/solver_memory.py --width 32 --heads 2 --batch 2 \
        --length 16 --steps 2 4 --methods reversible unrolled
    exit $status
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers, platform; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| python', platform.python_version(), '|', torch.cuda.get_device_name(0))"
step 240 train-speed-cuda.txt "$py" benchmarks/train_speed.py --device cuda --preset paper --precision bf16 \
    --steps 50 --json "$out/train-speed-cuda.json"
step 120 generation-cuda.txt "$py" benchmarks/generation.py --device cuda --threads 0 --batch-sizes 1 64 256 \
    --repeats 2 --ppl-train-steps 0
step 60 generation-gpu-host-cpu.txt "$py" benchmarks/generation.py --device cpu --threads 1 --batch-sizes 1 \
    --repeats 2 --ppl-train-steps 0
step 60 solver-memory-cuda.txt "$py" benchmarks/solver_memory.py --device cuda --width 768 --heads 12 --check
exit $status
