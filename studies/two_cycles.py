"""Why a trained model's residual stalls at 32 steps: the reversible pair (y, z) can settle on a 2-cycle of f.

    python studies/two_cycles.py CKPT [CKPT ...] --steps 8 16 32 64
    python studies/two_cycles.py CKPT --steps 32 64 --variants reversible:0.3 relaxed:0.5 picard:1

The reversible iteration (docs/DESIGN.md §1)

    y[n+1] = (1 - beta) * y[n] + beta * f(z[n]),    z[n+1] = (1 - beta) * z[n] + beta * f(y[n+1])

is at rest wherever y = f(z) and z = f(y), for every beta: at a fixed point of f (y = z), but also on a 2-cycle
of f (y != z). There the model's output z is not a fixed point of f, its relative residual ||z - f(z)|| / ||f(z)||
is ||z - y|| / ||y||, and more steps (or a smaller beta) do not reduce it. Near a fixed point whose Jacobian has an
eigenvalue close to -1 the cycle straddles it: the pair's midpoint m = (y + z) / 2 is a first-order estimate of it.

For each checkpoint and step count this prints the validation perplexity and the largest per-window relative
residual read at z (what the model returns) and at m, and then, for the worst window at the last step count, the
position whose residual is largest with ||y - f(z)||, ||z - f(y)|| and ||y - z|| relative to the state: a 2-cycle
when the first two are ~0 and the third is not. It runs the iteration itself (float64 states, f in float32, the
model's beta, z0 = the model's start) and checks it against the model's own solve on the first batch. Full windows
of 128 tokens (the split's tail left out), so the perplexity differs slightly from `revdeq eval`'s. CPU, --threads.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def relative(a, b):
    """||a - b|| / (1e-5 + ||b||) over the last dim (per position)."""
    return (a - b).norm(dim=-1) / (1e-5 + b.norm(dim=-1))


def window_residual(a, fa):
    """The per-window relative residual [B] (the solver's definition: the whole window's state flattened)."""
    return relative(a.flatten(1), fa.flatten(1))


def measure(checkpoint: str, steps: list[int], batch_size: int) -> None:
    import torch
    import torch.nn.functional as F

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus
    from revdeq_cli.model.block import AttentionMask

    model, _, settings, meta = load_checkpoint(checkpoint, device=torch.device("cpu"))
    model.eval()
    model.config.inference_readout = "z"  # the check below compares z_N; this script reads both itself
    corpus = prepare_corpus(settings.data.dataset, dataset_config=settings.data.dataset_config,
                            tokenizer=str(meta["path"]), offline=True, cache_dir=settings.data.cache_dir)
    tokens = torch.as_tensor(corpus.splits["validation"].astype("int64"))
    length = min(settings.data.seq_len, model.config.max_position_embeddings)
    windows = (len(tokens) - 1) // length
    beta, last = model.config.beta, max(steps)
    totals = {(k, r): [0.0, 0.0] for k in steps for r in ("z", "m")}  # nll, max window residual
    worst = (-1.0, None)  # (residual at z after the last step, the pair of that window)
    with torch.no_grad():
        for first in range(0, windows, batch_size):
            count = min(batch_size, windows - first)
            ids = tokens[first * length: (first + count) * length + 1]
            inputs, targets = ids[:-1].view(count, length), ids[1:].view(count, length)
            x = model.wte(inputs) + model.wpe(torch.arange(length)[None])
            mask = AttentionMask.build(0, length, None, x.device)

            def f(state, x=x, mask=mask):
                return model.blocks[0](state.to(x.dtype), x, mask).double()

            y = z = model._z0(x).double()
            for n in range(1, last + 1):
                y = (1 - beta) * y + beta * f(z)
                z = (1 - beta) * z + beta * f(y)
                if first == 0 and n == steps[0]:  # the same iteration as the model's own solve
                    own = model.probe_equilibrium(inputs, solver_steps=n).z.double()
                    gap = float((own - z).abs().max() / z.abs().max())
                    if gap > 1e-5:
                        raise SystemExit(f"{checkpoint}: this script's iteration differs from the model's ({gap:.1e})")
                if n not in steps:
                    continue
                for name, state in (("z", z), ("m", (y + z) / 2)):
                    logits = model.read_out(state.to(x.dtype))
                    total = totals[(n, name)]
                    total[0] += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
                    total[1] = max(total[1], float(window_residual(state, f(state)).max()))
                if n == last:
                    res = window_residual(z, f(z))
                    j = int(res.argmax())
                    if float(res[j]) > worst[0]:
                        worst = (float(res[j]), (y[j:j + 1], z[j:j + 1], f(y)[j:j + 1], f(z)[j:j + 1], first + j))
    scored = windows * length
    print(f"\n{checkpoint} ({windows} validation windows of {length}, beta {beta:g})\n")
    print("| solver steps | ppl at z | ppl at (y + z) / 2 | max residual at z | at (y + z) / 2 |")
    print("|---:|---:|---:|---:|---:|")
    for k in steps:
        (nz, rz), (nm, rm) = totals[(k, "z")], totals[(k, "m")]
        print(f"| {k} | {math.exp(nz / scored):.3f} | {math.exp(nm / scored):.3f} | {rz:.2e} | {rm:.2e} |")
    _, (y, z, fy, fz, window) = worst
    per_position = relative(z, fz)[0]
    p = int(per_position.argmax())
    print(f"\nworst window {window}, its worst position {p} after {last} steps: ||z - f(z)||/||f(z)|| "
          f"{float(per_position[p]):.3f}, ||y - f(z)||/||f(z)|| {float(relative(y, fz)[0, p]):.1e}, "
          f"||z - f(y)||/||f(y)|| {float(relative(z, fy)[0, p]):.1e}, "
          f"||y - z||/||z|| {float(relative(y, z)[0, p]):.3f}; "
          f"positions of that window with a residual > 2e-2: {int((per_position > 2e-2).sum())}")


def variants(checkpoint: str, specs: list[str], steps: list[int], batch_size: int) -> None:
    """The same model solved otherwise at inference: `solver:beta` (e.g. reversible:0.3, relaxed:0.5, picard:1),
    read at z, through `revdeq eval`'s own evaluation (`solver_steps_sweep`): does another beta or solver settle what
    the reversible pair does not?"""
    import torch

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus
    from revdeq_cli.training.evaluate import solver_steps_sweep

    model, _, settings, meta = load_checkpoint(checkpoint, device=torch.device("cpu"))
    corpus = prepare_corpus(settings.data.dataset, dataset_config=settings.data.dataset_config,
                            tokenizer=str(meta["path"]), offline=True, cache_dir=settings.data.cache_dir)
    config = model.config
    print(f"\n{checkpoint}: the model solved by another solver or beta at inference (read at z; whole validation "
          f"split, as revdeq eval)\n")
    print("| solver:beta | " + " | ".join(f"ppl / max residual @ {k}" for k in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for spec in specs:
        solver, beta = spec.split(":")
        config.solver, config.beta, config.inference_readout = solver, float(beta), "z"
        config.adjoint = "reversible" if solver == "reversible" else "unrolled"  # no gradient is taken
        rows = solver_steps_sweep(model, corpus.splits["validation"], steps, [None], split="validation",
                                  split_bytes=corpus.split_bytes["validation"], seq_len=settings.data.seq_len,
                                  batch_size=batch_size)
        print(f"| {spec} | " + " | ".join(f"{r.perplexity:.2f} / {r.max_residual:.3f}" for r in rows) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=[], metavar="SOLVER:BETA",
                        help="also evaluate each checkpoint solved by these at inference, e.g. reversible:0.3 "
                             "reversible:0.7 relaxed:0.5 anderson:0.5 picard:1")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    for checkpoint in args.checkpoints:
        measure(checkpoint, sorted(set(args.steps)), args.batch_size)
        if args.variants:
            variants(checkpoint, args.variants, sorted(set(args.steps)), args.batch_size)


if __name__ == "__main__":
    main()
