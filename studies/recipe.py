"""The training-recipe study: RevDEQ variants against explicit transformers and the unrolled looped block, at
equal optimiser steps, each model at its own best learning rate.

    python studies/recipe.py screen                      # every model x the lr grid, 300 steps, seed 0
    python studies/recipe.py confirm --models a,b,...    # finalists: lr grid at 1200 steps, + seed 1 at the best
    python studies/recipe.py report                      # recipe.md and recipe_val_ppl.png from the runs so far
    python studies/recipe.py run --models revdeq-input --lrs 2e-3 --steps 300 --seeds 0   # any subset

Every run trains with `revdeq_cli.training.Trainer` (what `revdeq train` runs) on pydoc with the byte
tokenizer and the `tiny` width, 128-token sequences, in a fresh process with one torch thread (`--jobs`
processes at a time). All training settings are pinned here (RECIPE below), so a change of the package's
defaults does not change a finished study; only the model options of each entry and the learning rate and
seed differ. Validation perplexity is measured on the first --curve-batches batches every --curve-every steps
(the curve) and on the whole validation split at the end (the table).

Runs are appended to `studies/results/recipe-runs.jsonl` (one JSON object a line) and skipped when
already there, so a study can be stopped and continued; `report` rebuilds the table and plot from that file.

The fairness rule: every model gets the same learning-rate grid and seeds; the table reports each at its
own best rate (lowest mean final validation perplexity over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _study  # noqa: E402  (the runs file and child processes, shared with equilibrium.py)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_FILE = RESULTS_DIR / "recipe-runs.jsonl"

# Training settings every run shares (dotted settings keys; see revdeq_cli/settings.py).
RECIPE: dict[str, Any] = {
    "train.recipe": "equilibrium",  # what the models' overrides start from (the recipe the presets carried then)
    "model.preset": "tiny",
    "model.max_position_embeddings": 128,
    "data.dataset": "pydoc",
    "data.tokenizer": "byte",
    "data.seq_len": 128,
    "data.offline": True,
    "train.batch_size": 16,
    "train.grad_accum": 1,
    "train.weight_decay": 0.1,
    "train.schedule": "cosine",
    "train.min_lr_ratio": 0.1,
    "train.grad_clip": 1.0,
    "train.precision": "fp32",
    "train.device": "cpu",
    "train.save_every": 0,
    "train.keep_last": 1,
    "log.progress": "plain",
    "log.log_every": 1000000,
    "log.tensorboard": False,
}
WARMUP_FRACTION = 0.1  # of the run's steps, for every model

# pinned: the DEQ defaults of the time of this study, before the presets took up the equilibrium recipe
_PRE_EQUILIBRIUM = {"model.block_skip": "state", "objective.detached_steps": "0",
                    "objective.fixed_point_penalty": 0.0, "objective.penalty_tail": 1.0, "objective.penalty_ramp": 0.0,
                    "objective.next_iterate_loss": 0.0, "solver.inference_readout": "z"}
_REV = {"solver.solver": "reversible", "solver.adjoint": "reversible", "solver.tol": 0.0,
        "solver.state_dtype": "float64", **_PRE_EQUILIBRIUM}
_INPUT = {**_REV, "model.init_state": "input"}

# name -> (label, settings overrides). DEQs run exactly max_steps solver steps (tol 0 = no early stop), so
# every model's compute per step is fixed and known. RETIRED (no overrides): a model whose option revdeq no longer
# has (model.output_init_scale, issue 41); its recorded runs stay in the report, a new run of it is refused.
RETIRED = _study.RETIRED
MODELS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "revdeq-zeros": ("RevDEQ, z0 = 0 (paper), beta 0.5, 4 steps",
                     {**_REV, "model.init_state": "zeros", "solver.beta": 0.5, "solver.max_steps": 4}),
    "revdeq-input": ("RevDEQ, z0 = x, beta 0.5, 4 steps",
                     {**_INPUT, "solver.beta": 0.5, "solver.max_steps": 4}),
    "revdeq-input-b0.8": ("RevDEQ, z0 = x, beta 0.8, 4 steps",
                          {**_INPUT, "solver.beta": 0.8, "solver.max_steps": 4}),
    "revdeq-input-b1.2": ("RevDEQ, z0 = x, beta 1.2, 4 steps",
                          {**_INPUT, "solver.beta": 1.2, "solver.max_steps": 4}),
    "revdeq-input-s1": ("RevDEQ, z0 = x, beta 0.5, 1 step",
                        {**_INPUT, "solver.beta": 0.5, "solver.max_steps": 1}),
    "revdeq-input-s2": ("RevDEQ, z0 = x, beta 0.5, 2 steps",
                        {**_INPUT, "solver.beta": 0.5, "solver.max_steps": 2}),
    "revdeq-input-s6": ("RevDEQ, z0 = x, beta 0.5, 6 steps",
                        {**_INPUT, "solver.beta": 0.5, "solver.max_steps": 6}),
    "revdeq-input-o2": ("RevDEQ, z0 = x, beta 0.5, 4 steps, output init x2", RETIRED),
    "revdeq-input-o0.5": ("RevDEQ, z0 = x, beta 0.5, 4 steps, output init x0.5", RETIRED),
    "picard-input": ("Picard, z0 = x, 4 steps, unrolled gradient",
                     {"solver.solver": "picard", "solver.adjoint": "unrolled", "solver.tol": 0.0,
                      "solver.max_steps": 4, "model.init_state": "input", **_PRE_EQUILIBRIUM}),
    "picard-zeros": ("Picard, z0 = 0, 4 steps, unrolled gradient",
                     {"solver.solver": "picard", "solver.adjoint": "unrolled", "solver.tol": 0.0,
                      "solver.max_steps": 4, "model.init_state": "zeros", **_PRE_EQUILIBRIUM}),
    "explicit-1": ("Transformer, 1 layer (same parameters)",
                   {"solver.solver": "explicit", "model.num_hidden_layers": 1}),
    "explicit-9": ("Transformer, 9 layers (the 4-step RevDEQ's forward evaluations)",
                   {"solver.solver": "explicit", "model.num_hidden_layers": 9}),
}
SCREEN_MODELS = [m for m, (_, overrides) in MODELS.items() if overrides is not RETIRED]
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)


# ---------------------------------------------------------------------------------------------- one run
def run_one(model: str, lr: float, steps: int, seed: int, curve_every: int, curve_batches: int) -> dict[str, Any]:
    """Train one model in this process and return its record (called in a fresh child process)."""
    import torch

    torch.set_num_threads(1)
    from revdeq_cli.settings import resolve_settings
    from revdeq_cli.training import loop
    from revdeq_cli.training.callbacks import Callback

    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"revdeq-recipe-{os.getpid()}"
    values = {**RECIPE, **MODELS[model][1], "train.lr": lr, "train.max_steps": steps, "train.seed": seed,
              "train.warmup_steps": max(1, round(WARMUP_FRACTION * steps)), "train.eval_every": curve_every,
              "train.eval_batches": curve_batches, "train.out_dir": str(out_dir)}
    settings = resolve_settings(sets=[f"{k}={json.dumps(v)}" for k, v in values.items()], environ={})

    curve: list[tuple[int, float]] = []

    class CurveRecorder(Callback):  # the validation prefix's perplexity at each evaluation
        def on_evaluation(self, trainer: Any, split: str, loss: float) -> None:
            if split == "validation-prefix":
                curve.append((trainer.step, math.exp(loss)))

    t0 = time.perf_counter()
    summary = loop.train(settings, callbacks=[CurveRecorder()])
    wall = time.perf_counter() - t0
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    history = summary.history
    return {
        "model": model, "lr": lr, "steps": steps, "seed": seed, "val_ppl": math.exp(summary.final_val_loss),
        "test_ppl": math.exp(summary.test_loss), "train_seconds": summary.seconds, "wall_seconds": wall,
        "curve": curve, "final_residual": history[-1].get("solver_residual") if history else None,
        "max_reconstruction_error": max((h.get("reconstruction_error") or 0.0) for h in history
                                        if not math.isnan(h.get("reconstruction_error", math.nan))) if any(
            not math.isnan(h.get("reconstruction_error", math.nan)) for h in history) else None,
        "non_embedding_params": None,
    }


# ---------------------------------------------------------------------------------------------- the study
def load_runs() -> list[dict[str, Any]]:
    return _study.load_runs(RUNS_FILE)


def _describe(record: dict[str, Any]) -> str:
    return f"val ppl {record['val_ppl']:.3f}"


def run_many(jobs_list: list[tuple[str, float, int, int]], args: argparse.Namespace) -> None:
    _study.run_missing(jobs_list, args, script=__file__, runs_file=RUNS_FILE, describe=_describe)


def best_per_model(runs: list[dict[str, Any]], steps: int) -> dict[str, dict[str, Any]]:
    """For each model at `steps`: the lr with the lowest mean val ppl over its seeds, and that lr's runs."""
    out: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            if r["model"] == model and int(r["steps"]) == steps:
                by_lr.setdefault(float(r["lr"]), []).append(r)
        if not by_lr:
            continue
        # the rate with the lowest mean over the seeds it ran (finalists' best rates have 2 seeds)
        def mean_of(lr: float, by_lr: dict[float, list[dict[str, Any]]] = by_lr) -> float:
            return statistics.mean(r["val_ppl"] for r in by_lr[lr])

        def seed0(lr: float, by_lr: dict[float, list[dict[str, Any]]] = by_lr) -> float:
            vals = [r["val_ppl"] for r in by_lr[lr] if int(r["seed"]) == 0]
            return vals[0] if vals else mean_of(lr)

        lr = min(by_lr, key=mean_of)
        vals = [r["val_ppl"] for r in by_lr[lr]]
        out[model] = {"lr": lr, "runs": by_lr[lr], "mean": statistics.mean(vals),
                      "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else None,
                      "grid": {g: seed0(g) for g in sorted(by_lr)}}
    return out


def report(args: argparse.Namespace) -> str:
    # failed runs (and runs stopped on purpose) are kept in the file for the record but not in the table
    runs = [r for r in load_runs() if "failed" not in r and math.isfinite(r.get("val_ppl", math.inf))]
    lines = ["# Recipe study", "", f"Machine: {machine()}.", "",
             "`python studies/recipe.py screen` / `confirm` / `run` / `report`; pydoc, byte tokenizer, tiny width "
             "(128, 4 heads, MLP 512, 128-token context), 128-token sequences, batch 16, AdamW (weight decay 0.1, "
             f"betas 0.9/0.99), cosine schedule to 0.1x with {WARMUP_FRACTION:.0%} warmup, gradient clipping 1.0, "
             "fp32, one torch thread per run. DEQs run exactly their solver steps (no early stop). Validation "
             "perplexity (bytes) on the whole validation split at the end of the run; each model at its own best "
             "learning rate among those it ran (listed per row: the lowest mean over the seeds it ran); mean ± "
             "half-range over seeds. Grid: 1e-3, 2e-3, 4e-3 at 300 steps (extended to 8e-3 where a model's best was "
             "4e-3); at 1200 steps the finalists' best two rates from 300 steps, then 3e-3, 6e-3, 8e-3, 1.2e-2 "
             "as long as a model's best sat at the edge of what it had run; seed 1 at each finalist's best. "
             "`vs explicit-1`: the mean over the 1-layer transformer's (same parameters) at the same step count.", ""]
    for steps in sorted({int(r["steps"]) for r in runs}):
        best = best_per_model(runs, steps)
        ref = best.get("explicit-1", {}).get("mean")
        lines += [f"## {steps} steps", "",
                  "| model | best lr | val ppl (mean ± half-range) | seeds | vs explicit-1 | val ppl per lr (seed 0) "
                  "| s/run |", "|---|---:|---:|---:|---:|---|---:|"]
        for model, b in sorted(best.items(), key=lambda kv: kv[1]["mean"]):
            spread = f" ± {b['spread']:.2f}" if b["spread"] is not None else ""
            grid = ", ".join(f"{g:g}: {v:.2f}" for g, v in b["grid"].items())
            secs = statistics.mean(r.get("train_seconds", math.nan) for r in b["runs"])
            ratio = f"{b['mean'] / ref:.3f}x" if ref else "-"
            lines.append(f"| {MODELS[model][0]} | {b['lr']:g} | {b['mean']:.2f}{spread} | {len(b['runs'])} | "
                         f"{ratio} | {grid} | {secs:.0f} |")
        lines.append("")
    lines += ["s/run is wall time on a machine shared with other jobs (up to 5 runs on 2 cores): compare costs "
              "with `benchmarks/compare.py`, not with this column.", ""]
    text = "\n".join(lines)
    (RESULTS_DIR / "recipe.md").write_text(text + "\n")
    _plot(runs)
    return text


def _plot(runs: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = max((int(r["steps"]) for r in runs), default=0)
    best = best_per_model(runs, steps)
    if not best:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for model, b in sorted(best.items(), key=lambda kv: kv[1]["mean"]):
        run = min(b["runs"], key=lambda r: int(r["seed"]))
        if run.get("curve"):
            xs, ys = zip(*run["curve"], strict=True)
            ax.plot(list(xs) + [steps], list(ys) + [run["val_ppl"]], label=f"{MODELS[model][0]} (lr {b['lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation perplexity (byte)")
    ax.set_title(f"Recipe study: best learning rate of each model, {steps} steps (seed 0)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(RESULTS_DIR / "recipe_val_ppl.png", bbox_inches="tight", dpi=110)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["screen", "confirm", "run", "report", "child"])
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--models", default=None, help="comma-separated names from MODELS")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the grid)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--curve-every", type=int, default=None)
    p.add_argument("--curve-batches", type=int, default=4)
    args = p.parse_args(argv)
    if args.action == "child":
        spec = json.loads(args.spec)
        print(json.dumps(run_one(**spec)))
        return 0
    models = _study.chosen_models(p, args, MODELS, SCREEN_MODELS)
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else list(LR_GRID)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.action == "screen":
        run_many([(m, lr, args.steps or 300, 0) for m in models for lr in lrs], args)
    elif args.action == "confirm":
        steps = args.steps or 1200
        run_many([(m, lr, steps, 0) for m in models for lr in lrs], args)
        best = best_per_model(load_runs(), steps)
        run_many([(m, best[m]["lr"], steps, s) for m in models if m in best for s in (seeds if seeds != [0] else [1])],
                 args)
    elif args.action == "run":
        run_many([(m, lr, args.steps or 300, s) for m in models for lr in lrs for s in seeds], args)
    print(report(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
