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

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus
    from revdeq_cli.deq.state import relative_residual
    from revdeq_cli.model.block import AttentionMask

    torch.set_num_threads(args.threads)
    model, _, settings, meta = load_checkpoint(args.checkpoint)
    model.eval()
    corpus = prepare_corpus(settings.data.dataset, tokenizer=meta["path"], offline=True,
                            cache_dir=settings.data.cache_dir)
    length = min(settings.data.seq_len, model.config.max_position_embeddings)
    ids = torch.tensor(corpus.splits["validation"][: args.windows * length + 1], dtype=torch.long)
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
        x = model.wte(inputs) + model.wpe(torch.arange(length))
        mask = AttentionMask.build(0, length, None, x.device)
        for spec in args.settings.split(","):
            solver, beta, steps = spec.split(":")
            model.config.solver, model.config.beta = solver, float(beta)
            if solver != "reversible":
                model.config.adjoint = "unrolled"
            z, _ = model._solve_full(x, mask, solver_steps=int(steps))
            fz = model.blocks[0](z, x, mask)
            hidden = z.shape[-1]
            r = relative_residual(z.reshape(-1, hidden).double(), fz.reshape(-1, hidden).double()).view(rows, length)
            window = relative_residual(z.flatten(1).double(), fz.flatten(1).double()).max()
            logits = model.lm_head(model.ln_f(z))
            ppl = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).exp()
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
