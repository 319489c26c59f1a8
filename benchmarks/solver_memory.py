"""Peak memory and time of one forward+backward through a DEQ layer, per gradient method and step count.

    python benchmarks/solver_memory.py                      # CPU: batch 8, length 128, width 128
    python benchmarks/solver_memory.py --device cuda --width 768 --heads 12

f is the RevDEQ language model's transformer block (float32), solved with the Reversible solver (beta 0.5,
float64 states) for exactly N steps (no early stop, so every method does the same forward work).
Memory: on CUDA, max_memory_allocated during the step minus what was allocated before it. On CPU, the
increase of the process's peak resident set size during the step, each (method, N) in a fresh process
(peak RSS cannot be reset), so it includes allocator slack but not the interpreter, torch or the block.
Time: median of --repeats runs in this process, the methods interleaved so machine load affects them alike.

Checks (exit 1 on failure with --check): Reversible's peak at the largest N is <= 1.1x its peak at the
smallest N, and Reversible's time is <= 1.3x Unrolled's at every N.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deq_bench import METHODS, add_block_args, forward_backward, machine, make_problem, timed  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def measure_memory(args: argparse.Namespace, method: str, steps: int) -> int:
    """Bytes of extra memory one forward+backward needs (see module docstring)."""
    block, x, cotangent = make_problem(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(block, x, cotangent, method, steps, args.beta)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_bytes()
    forward_backward(block, x, cotangent, method, steps, args.beta)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def memory_in_subprocess(args: argparse.Namespace, method: str, steps: int) -> int:
    cmd = [sys.executable, __file__, "--measure-one", method, str(steps), "--device", args.device,
           "--batch", str(args.batch), "--length", str(args.length), "--width", str(args.width),
           "--heads", str(args.heads), "--beta", str(args.beta), "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["bytes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_block_args(parser)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if the memory/time requirements fail")
    parser.add_argument("--measure-one", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure_one:
        method, steps = args.measure_one
        print(json.dumps({"bytes": measure_memory(args, method, int(steps))}))
        return 0

    mib = {}
    for steps in args.steps:
        for method in args.methods:
            if args.device.startswith("cuda"):
                mib[method, steps] = measure_memory(args, method, steps) / 2**20
            else:
                mib[method, steps] = memory_in_subprocess(args, method, steps) / 2**20

    block, x, cotangent = make_problem(args)
    forward_backward(block, x, cotangent, "unrolled", 2, args.beta)  # warm-up: kernels, allocator
    times: dict[tuple[str, int], list[float]] = {}
    nfe: dict[tuple[str, int], tuple[int, int]] = {}
    for steps in args.steps:
        for _ in range(args.repeats):
            for method in args.methods:
                box = {}
                t = timed(lambda m=method, s=steps, b=box: b.setdefault(
                    "sol", forward_backward(block, x, cotangent, m, s, args.beta)), args.device)
                times.setdefault((method, steps), []).append(t)
                nfe[method, steps] = (box["sol"].nfe, box["sol"].backward.nfe)
                block.zero_grad(set_to_none=True)
                x.grad = None

    print(f"# solver_memory: one forward+backward, batch {args.batch}, length {args.length}, width {args.width}, "
          f"{args.heads} heads; Reversible solver beta {args.beta}, float64 states; {machine(args.device)}")
    print(f"{'steps':>5}  {'method':<10} {'peak MiB':>9} {'time ms':>9} {'fwd nfe':>8} {'bwd nfe':>8}")
    for steps in args.steps:
        for method in args.methods:
            ms = 1000 * statistics.median(times[method, steps])
            f_nfe, b_nfe = nfe[method, steps]
            print(f"{steps:>5}  {method:<10} {mib[method, steps]:>9.1f} {ms:>9.1f} {f_nfe:>8} {b_nfe:>8}")

    ok = True
    if {"reversible", "unrolled"} <= set(args.methods):
        lo, hi = min(args.steps), max(args.steps)
        ratio = mib["reversible", hi] / mib["reversible", lo]
        unrolled_ratio = mib["unrolled", hi] / mib["unrolled", lo]
        print(f"\nreversible peak memory {hi} vs {lo} steps: {ratio:.2f}x (required <= 1.10x); "
              f"unrolled: {unrolled_ratio:.2f}x")
        ok &= ratio <= 1.1
        for steps in args.steps:
            t_ratio = statistics.median(times["reversible", steps]) / statistics.median(times["unrolled", steps])
            print(f"reversible / unrolled time at {steps:>2} steps: {t_ratio:.2f}x (required <= 1.30x)")
            ok &= t_ratio <= 1.3
        print("requirements:", "PASS" if ok else "FAIL")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
