"""What `train.precision` costs per training step on this machine: float32 against bfloat16 autocast.

    python benchmarks/precision_speed.py                 # the tiny preset's step, 2 torch threads
    python benchmarks/precision_speed.py --threads 1 --repeats 9

`train.precision: auto` (the default) trains under bfloat16 autocast where `deq.precision.native_low_precision`
finds native bfloat16 matrix instructions (CUDA >= 8.0, CPUs with AMX or AVX512-BF16) and in float32 elsewhere.
This prints what that choice is here, then two tables: the matrix products of the tiny preset's block at its
training shapes ([16 x 128] tokens against the block's weights), in GFLOP/s, and one whole training step of the
default recipe's model and objective (`revdeq_cli.recipes`, `TrainingObjective`; forward, backward, AdamW; the
byte vocabulary, random tokens; the preset's 2 differentiated steps after 0 or 6 graph-free ones, 6 being the
default rule's mean), median of --repeats, the two formats alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (rows, inner, columns) of the tiny block's products at [16, 128] tokens: qkv, attention output, MLP in, MLP out
GEMM_SHAPES = ((2048, 128, 384), (2048, 128, 128), (2048, 128, 512), (2048, 512, 128))
DETACHED = (0, 6)


def gemm_rate(shape: tuple[int, int, int], dtype, repeats: int) -> float:
    """GFLOP/s of `a @ b` at `shape` in `dtype` (the median over `repeats` timings of 20 products)."""
    import torch

    rows, inner, cols = shape
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    for _ in range(5):
        a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        rates.append(20 * 2 * rows * inner * cols / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def step_seconds(detached: int, repeats: int, vocab: int) -> dict[str, float]:
    """Median seconds of a training step of the tiny preset in float32 and under bf16 autocast (one model each,
    the same start, alternating)."""
    import torch
    from _deq_bench import recipe_training

    ids = torch.randint(0, vocab, (16, 129), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model, objective = recipe_training("tiny", config_fields={"vocab_size": vocab}, detached_steps=str(detached))
        runs[name] = (model, objective, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(name: str) -> float:
        model, objective, opt = runs[name]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            terms = objective(model, ids[:, :-1], ids[:, 1:], step=0, total_steps=None)
        terms.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in runs:
        step(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name in runs:
            times[name].append(step(name))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=257, help="vocabulary size (257: the byte tokenizer)")
    args = ap.parse_args()

    import torch

    from revdeq_cli.deq.precision import native_low_precision

    torch.set_num_threads(args.threads)
    from _deq_bench import host

    native = native_low_precision(torch.device("cpu"))
    print(f"{host()}; {args.threads} torch threads; median of {args.repeats}")
    # the probes are private torch API (guarded as in deq.precision): None where this torch lacks one
    probes = {name: getattr(torch.cpu, f"_is_{probe}_supported", lambda: None)()
              for name, probe in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16"))}
    print(f"train.precision auto here: {'bf16' if native is torch.bfloat16 else 'fp32'} "
          f"({', '.join(f'{name} {found}' for name, found in probes.items())})\n")
    print("| product [rows x inner] @ [inner x cols] | float32 | bfloat16 | ratio |")
    print("|---|---:|---:|---:|")
    for shape in GEMM_SHAPES:
        f32, b16 = (gemm_rate(shape, dtype, args.repeats) for dtype in (torch.float32, torch.bfloat16))
        print(f"| [{shape[0]} x {shape[1]}] @ [{shape[1]} x {shape[2]}] | {f32:.0f} GFLOP/s | {b16:.0f} GFLOP/s | "
              f"{b16 / f32:.2f}x |", flush=True)
    print("\n| training step, tiny preset, [16, 128] tokens | float32 | bf16 autocast | speed-up |")
    print("|---|---:|---:|---:|")
    for detached in DETACHED:
        t = step_seconds(detached, args.repeats, args.vocab)
        print(f"| 2 differentiated steps after {detached} graph-free | {1000 * t['fp32']:.0f} ms | "
              f"{1000 * t['bf16']:.0f} ms | {t['fp32'] / t['bf16']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
