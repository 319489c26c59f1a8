"""Validation loss per position: does a checkpoint predict as well late in its context as early?

    python benchmarks/position_loss.py runs/pydoc-20261129-120000           # the run's newest checkpoint
    python benchmarks/position_loss.py CKPT --split test --bucket 64 --json

Cuts the split (`--split`, default validation) of the checkpoint's dataset (or `--dataset`) into
non-overlapping windows of the model's declared context C (`max_position_embeddings`; `--context` for
another length), as `revdeq eval` and an evaluation harness reading the config would, scores every target
and averages the loss (nats/token) per position. Prints the mean loss over positions [0, C/2) and
[C/2, C), then per bucket of `--bucket` positions (default 32). A checkpoint trained on shorter sequences
than it declares shows it at once: the positions it never trained on score far worse.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def position_losses(model, tokens, context: int, batch_size: int) -> tuple[list[float], list[int]]:
    """(summed loss, scored targets) per position 0..context-1 over non-overlapping windows of `tokens`."""
    import torch

    from revdeq_cli.data import IGNORE_INDEX, eval_batches

    sums = torch.zeros(context, dtype=torch.float64)
    counts = torch.zeros(context, dtype=torch.long)
    with torch.no_grad():
        for inputs, targets in eval_batches(tokens, context, batch_size):
            logits = model(input_ids=inputs).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                    reduction="none")
            scored = targets != IGNORE_INDEX
            sums += (nll * scored).double().sum(0)
            counts += scored.sum(0)
    return sums.tolist(), counts.tolist()


def mean(sums: list[float], counts: list[int], lo: int, hi: int) -> float:
    n = sum(counts[lo:hi])
    return sum(sums[lo:hi]) / n if n else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint or run directory")
    parser.add_argument("--dataset", default=None, help="dataset (default: the run's)")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--context", type=int, default=None, help="window length (default: max_position_embeddings)")
    parser.add_argument("--bucket", type=int, default=32, help="positions per bucket in the table")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    import torch

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus

    torch.set_grad_enabled(False)
    model, _, settings, meta = load_checkpoint(args.checkpoint)
    declared = model.config.max_position_embeddings
    context = args.context or declared
    dataset = args.dataset or (settings.data.dataset if settings is not None else None)
    if dataset is None:
        parser.error(f"{meta['path']} has no training settings to take the dataset from; pass --dataset")
    corpus = prepare_corpus(dataset, tokenizer=meta["path"], offline=True)
    sums, counts = position_losses(model, corpus.splits[args.split], context, args.batch_size)
    half = context // 2
    trained = settings.data.seq_len if settings is not None else None
    result = {
        "checkpoint": meta["path"], "step": meta.get("step"), "split": args.split, "context": context,
        "declared_context": declared, "trained_seq_len": trained,
        "first_half": mean(sums, counts, 0, half), "second_half": mean(sums, counts, half, context),
        "buckets": [{"positions": [lo, min(lo + args.bucket, context) - 1],
                     "loss": mean(sums, counts, lo, lo + args.bucket)} for lo in range(0, context, args.bucket)],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"checkpoint {result['checkpoint']} (step {result['step']}): declared context {declared}, trained "
          f"seq_len {trained}; {dataset} {args.split} split, windows of {context}")
    print(f"positions [0, {half}): loss {result['first_half']:.4f}")
    print(f"positions [{half}, {context}): loss {result['second_half']:.4f}")
    for b in result["buckets"]:
        lo, hi = b["positions"]
        print(f"  {lo:5d}-{hi:<5d} {b['loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
