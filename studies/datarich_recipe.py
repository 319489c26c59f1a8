"""Which RevDEQ recipe trains best where data is not the limit (issue 42; docs/performance.md §Recipe search on
stdlib): candidates that each change one thing of the `equilibrium` recipe, trained under benchmarks/datarich.py's
protocol (stdlib, tiny width, byte tokens, batch 16 x 128, fp32, one thread, the same AdamW and schedule), so
their figures sit beside that study's six models.

    python studies/datarich_recipe.py screen                  # every candidate, 1200 steps, seed 0
    python studies/datarich_recipe.py confirm --models a b    # those candidates at 3000 steps (6.1M tokens)
    python studies/datarich_recipe.py report                  # the table, from the runs file alone

The budget (2 cores): one learning rate, the equilibrium recipe's best in datarich.py's screen (2e-3; --lr), one
seed, 1200 steps each; the best candidates are confirmed at 3000 steps beside the datarich confirm run of the
recipe itself. The baseline's figures are datarich.py's `revdeq-equilibrium` runs at that lr (the same protocol,
the same run), read from benchmarks/results/datarich-runs.jsonl, not run again.

Runs are appended to studies/results/datarich-recipe-runs.jsonl as they finish and skipped when already there.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402
import datarich  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS_FILE = "datarich-recipe-runs.jsonl"
BASELINE = "revdeq-equilibrium"

_EXACT_8 = {"objective.detached_steps": "0", "solver.max_steps": 8, "solver.tol": 0.0}
# name -> (what it changes, the settings over `train.recipe=equilibrium`)
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "diff-4": ("4 differentiated steps after the graph-free start (2)", {"solver.max_steps": 4}),
    "start-2": ("graph-free start of mean 2 steps, at most 8 (mean 6, at most 24)",
                {"objective.detached_steps": "poisson-lognormal:2:8"}),
    "no-penalty": ("no fixed-point penalty (2 on the worst 10%)", {"objective.fixed_point_penalty": 0.0}),
    "no-next-loss": ("no cross-entropy at f(z_N) (weight 1)", {"objective.next_iterate_loss": 0.0}),
    "reversible-8": ("no graph-free start: the exact reversible gradient through 8 steps (beta 0.5)", _EXACT_8),
    "reversible-8-beta-0.8": ("as reversible-8 with beta 0.8", {**_EXACT_8, "solver.beta": 0.8}),
    "picard-unrolled-8": ("no graph-free start: Picard (beta 1) for 8 steps, backprop through every step",
                          {**_EXACT_8, "solver.solver": "picard", "solver.adjoint": "unrolled",
                           "solver.beta": 1.0}),
}


def specs() -> dict[str, compare.ModelSpec]:
    return {name: compare.ModelSpec(f"equilibrium, {what}", {}, settings={"train.recipe": "equilibrium", **values})
            for name, (what, values) in CANDIDATES.items()}


def studies(args: argparse.Namespace) -> tuple[datarich.Study, datarich.Study]:
    """The candidates' study and datarich.py's own (for the baseline), both under datarich.py's protocol."""
    opts = datarich.parse_args(["report", "--out-dir", str(RESULTS), "--screen-steps", str(args.screen_steps),
                                "--steps", str(args.steps), "--lrs", str(args.lr), "--seeds", "0"])
    opts.command = "python studies/datarich_recipe.py " + shlex.join(sys.argv[1:])
    base_opts = datarich.parse_args(["report", "--screen-steps", str(args.screen_steps), "--steps", str(args.steps),
                                     "--seeds", "0"])
    return datarich.Study(opts, specs=specs(), runs_file=RUNS_FILE), datarich.Study(base_opts)


def row(name: str, what: str, screen: dict | None, confirm: dict | None) -> str:
    def ppl(r: dict | None) -> str:
        return "–" if r is None else f"{datarich.ppl_of(r):.2f}"

    def res(r: dict | None, key: str, spec: str) -> str:
        value = None if r is None else r["result"].get(key)
        return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)

    sweep = "–"
    if confirm is not None and confirm["result"].get("inference_sweep"):
        sweep = " / ".join(f"{s['ppl']:.2f}" for s in confirm["result"]["inference_sweep"])
    bwd = res(screen, "bwd_nfe", ".1f")
    if screen is not None and screen["result"]["config"]["adjoint"] == "unrolled":  # autograd: no count of its own
        bwd = f"{res(screen, 'fwd_nfe', '.0f')} (autograd)"
    return (f"| `{name}` | {what} | {ppl(screen)} | {res(screen, 'fwd_nfe', '.1f')} / {bwd} "
            f"| {res(screen, 'train_seconds', '.0f')} | {ppl(confirm)} | {sweep} |")


def report(args: argparse.Namespace) -> str:
    study, base = studies(args)
    lines = [f"Candidates over the `equilibrium` recipe, datarich.py's protocol, lr {args.lr:g}, seed 0; screen "
             f"{args.screen_steps} steps, confirm {args.steps}. Validation perplexity on the whole split; the sweep "
             "is the confirm run's perplexity at 1, 2, 4, 8, 16, 32, 64 inference steps (first validation batches).",
             "", "| candidate | change | screen ppl | block evals / token fwd / bwd | screen train s | confirm ppl "
             "| confirm: ppl at 1 / 2 / 4 / 8 / 16 / 32 / 64 steps |", "|---|---|---:|---|---:|---:|---|"]
    lines.append(row("equilibrium", "the recipe (datarich.py's `revdeq-equilibrium`)",
                     base.find("screen", BASELINE, args.lr, 0, args.screen_steps),
                     base.find("confirm", BASELINE, args.lr, 0, args.steps)))
    for name, (what, _) in CANDIDATES.items():
        lines.append(row(name, what, study.find("screen", name, args.lr, 0, args.screen_steps),
                         study.find("confirm", name, args.lr, 0, args.steps)))
    machines = sorted({r["machine"] for r in study.runs})
    lines += ["", f"Machine: {'; '.join(machines) or '–'}. Runs: `studies/results/{RUNS_FILE}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["screen", "confirm", "report"])
    p.add_argument("--models", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--screen-steps", type=int, default=1200)
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args(argv)
    study, _ = studies(args)
    if args.action != "report":
        import torch

        torch.set_num_threads(study.opts.threads)
        for name in args.models:
            if args.action == "screen":
                study.run("screen", name, args.lr, 0, steps=args.screen_steps)
            else:
                study.run("confirm", name, args.lr, 0, steps=args.steps)
    text = report(args)
    (RESULTS / "datarich-recipe.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
