"""What the next-iterate cross-entropy (`objective.next_iterate_loss`) costs per training step.

    python benchmarks/next_iterate_cost.py                     # tiny and small, byte and GPT-2-sized vocabularies

It reads the cross-entropy at f(z_N), which the fixed-point penalty evaluates anyway, so its cost is the output
head once more (forward and backward). That is nothing next to f with the byte vocabulary (257) and more than f
with a 50k one. Each row: one training step (forward, backward; no optimiser) of the preset's model and the
`TrainingObjective` of the default recipe (6 graph-free steps + the preset's differentiated steps, penalty on),
median of --repeats, alternating with and without the term, random tokens, CPU, --threads torch threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = (("tiny", 257, 16), ("tiny", 50304, 16), ("small", 257, 4), ("small", 50304, 4))


def step_seconds(preset: str, vocab: int, batch: int, length: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a training step without and with the next-iterate cross-entropy."""
    import torch
    from _deq_bench import recipe_training

    ids = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    runs = []
    for mu in (0.0, 1.0):
        torch.manual_seed(0)
        runs.append(recipe_training(preset, config_fields={"vocab_size": vocab, "max_position_embeddings": length},
                                    detached_steps="6", next_iterate_loss=mu))

    def step(model, objective) -> float:
        start = time.perf_counter()
        objective(model, ids[:, :-1], ids[:, 1:], step=0, total_steps=None).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for run in runs:
        step(*run)  # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            times[i].append(step(*run))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from _deq_bench import host

    print(f"{host()}; {args.threads} torch threads; median of {args.repeats}\n")
    print("| preset | vocabulary | tokens | step without | step with | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for preset, vocab, batch in CASES:
        without, with_ = step_seconds(preset, vocab, batch, args.length, args.repeats)
        print(f"| {preset} | {vocab} | [{batch}, {args.length}] | {1000 * without:.0f} ms | {1000 * with_:.0f} ms | "
              f"{with_ / without:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
