"""Where does a checkpoint's iteration fail to settle? The relative residual of each position,
||f(z)_t - z_t|| / ||f(z)_t|| (float64), after k solver steps, over the first validation windows: its
quantiles, the fraction of positions above 2e-2, that fraction by position in the window, and the positions
(row, position, byte) with the largest residuals.

`revdeq eval`'s "max residual" is per window (the norms over all of a window's positions), so a handful of
positions that orbit instead of settling decide it while the median position has long converged.

    .venv/bin/python benchmarks/residual_positions.py CHECKPOINT [--settings reversible:0.5:32,...] [--windows 96]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKETS = ((0, 4), (4, 16), (16, 32), (32, 64), (64, 128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--settings", default="reversible:0.5:8,reversible:0.5:32,reversible:0.5:64,"
                        "reversible:0.2:64,reversible:0.2:128", help="comma-separated SOLVER:BETA:STEPS")
    parser.add_argument("--windows", type=int, default=96, help="validation windows scored (trained length each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from _checkpoint import load_checkpoint_with_data

    from revdeq_cli.deq.state import relative_residual

    loaded = load_checkpoint_with_data(args.checkpoint, threads=args.threads)
    model, meta, length = loaded.model, loaded.meta, loaded.seq_len
    ids = torch.tensor(loaded.validation[: args.windows * length + 1], dtype=torch.long)
    rows = (len(ids) - 1) // length
    inputs = ids[: rows * length].view(rows, length)
    targets = ids[1: rows * length + 1].view(rows, length)
    print(f"checkpoint {meta['path']} (trained: {model.config.solver} beta {model.config.beta}, detached "
          f"{model.config.train_detached_steps}); {rows} validation windows of {length}")
    print("| solver | beta | steps | ppl | median | q90 | q99 | max | frac > 2e-2 | by position "
          + " / ".join(f"{lo}-{hi - 1}" for lo, hi in BUCKETS) + " | window max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    worst: list[str] = []
    with torch.no_grad():
        for spec in args.settings.split(","):
            solver, beta, steps = spec.split(":")
            model.config.solver, model.config.beta = solver, float(beta)
            if solver != "reversible":
                model.config.adjoint = "unrolled"
            probe = model.probe_equilibrium(inputs, solver_steps=int(steps))
            r = probe.residual
            window = relative_residual(probe.z.flatten(1), probe.fz.flatten(1)).max()
            ppl = torch.nn.functional.cross_entropy(probe.logits.flatten(0, 1), targets.flatten()).exp()
            q = torch.quantile(r.flatten(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
            by_pos = " / ".join(f"{(r[:, lo:hi] > 2e-2).double().mean():.3f}" for lo, hi in BUCKETS)
            print(f"| {solver} | {beta} | {steps} | {ppl:.3f} | {q[0]:.1e} | {q[1]:.1e} | {q[2]:.1e} | {r.max():.2f} | "
                  f"{(r > 2e-2).double().mean():.4f} | {by_pos} | {window:.3f} |", flush=True)
            top = r.flatten().topk(8).indices.tolist()
            worst.append(f"{spec}: " + ", ".join(
                f"({i // length}, {i % length}, {inputs[i // length, i % length].item()})" for i in top))
    print("\nlargest residuals, (window, position, byte):")
    print("\n".join(worst))


if __name__ == "__main__":
    main()
