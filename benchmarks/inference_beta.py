"""Does a checkpoint's iteration settle, and at which beta? Perplexity and the largest relative residual after
8, 16, 32 and 64 solver steps with the solver (and beta) it trained with and with others. The fixed point
z* = f(z*) does not depend on the solver or beta, so where another solver reaches a small residual the fixed
point exists and the trained iteration merely fails to settle on it.

    .venv/bin/python benchmarks/inference_beta.py CHECKPOINT [--max-batches 6]

Scores the first --max-batches validation batches (16 windows of the trained length each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = [("reversible", 0.5), ("reversible", 0.3), ("reversible", 0.2), ("relaxed", 0.5), ("anderson", 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--max-batches", type=int, default=6)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--settings", default=None,
                        help="comma-separated SOLVER:BETA pairs (default: "
                        + ",".join(f"{s}:{b:g}" for s, b in SETTINGS) + ")")
    args = parser.parse_args()

    from _checkpoint import load_checkpoint_with_data

    from revdeq_cli.training.evaluate import evaluate_split

    loaded = load_checkpoint_with_data(args.checkpoint)
    model, corpus, meta, seq_len = loaded.model, loaded.corpus, loaded.meta, loaded.seq_len
    val = loaded.validation
    print(f"checkpoint {meta['path']}: trained with {model.config.solver} beta {model.config.beta}; first "
          f"{args.max_batches} validation batches; cells: perplexity / largest relative residual")
    print("| solver | beta | " + " | ".join(f"{k} steps" for k in args.steps) + " |")
    print("|---|---:|" + "---|" * len(args.steps))
    settings_list = SETTINGS if args.settings is None else [
        (item.split(":")[0], float(item.split(":")[1])) for item in args.settings.split(",")]
    for solver, beta in settings_list:
        model.config.solver, model.config.beta = solver, beta
        if solver != "reversible":
            model.config.adjoint = "unrolled"
        cells = []
        for k in args.steps:
            r = evaluate_split(model, val, split_bytes=corpus.split_bytes["validation"], seq_len=seq_len,
                               batch_size=16, solver_steps=k, max_batches=args.max_batches)
            cells.append(f"{r.perplexity:.3f} / {r.max_residual:.3f}")
        print(f"| {solver} | {beta:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
