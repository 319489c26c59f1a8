"""The equilibrium study: which training recipe makes the trained model an equilibrium model, one whose quality
holds (or improves) when the solver runs longer than it trained.

    python studies/equilibrium.py screen                  # every candidate, one rate, 600 steps, seed 0
    python studies/equilibrium.py confirm --models a,b    # the rate grid at 1200 steps, + seed 1 at the best
    python studies/equilibrium.py run --models base --lrs 3e-3 --steps 1200 --seeds 0,1   # any subset
    python studies/equilibrium.py report                  # equilibrium.md and the plot from the runs so far
    python studies/equilibrium.py run ... --same-cpu      # rerun here what ran on another CPU (same-CPU rows)

Every run trains with `revdeq_cli.training.Trainer` (what `revdeq train` runs; a `Callback` records the
validation curve), on pydoc with the byte tokenizer at the `tiny` width, in a fresh process with one torch
thread (`--jobs` processes at a time). The training settings are pinned here (`RECIPE`, the same as
studies/recipe.py's), so a change of the package's defaults does not change a finished study; only each
candidate's options, the learning rate and the seed differ. After training, the final model is evaluated on
the whole validation split at 0 (z = z0, the solver bypassed), 1, 2, 4, 8, 16 and 32 inference solver steps
(perplexity and the largest relative residual over the batches), and on the first validation-sized part of
the training split at its nominal training depth (train perplexity, to see overfitting).

Runs are appended to `studies/results/equilibrium-runs.jsonl` and skipped when already there, so a study
can be stopped and continued. Fairness: every candidate and baseline gets the same rate grid and seeds at a
given length; the table reports each at its own best rate (lowest mean validation perplexity at its own
inference steps, chosen per run as the smallest step count within 1% of that run's best).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _study  # noqa: E402  (the runs file and child processes, shared with recipe.py)
from recipe import RECIPE, WARMUP_FRACTION, machine  # noqa: E402  (the shared pinned settings)

from revdeq_cli.training.callbacks import Callback  # noqa: E402  (torch-free; the heavy imports stay lazy)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_FILE = RESULTS_DIR / "equilibrium-runs.jsonl"
INFERENCE_STEPS = (0, 1, 2, 4, 8, 16, 32)
MIDPOINT_STEPS = (8, 16, 32)  # the model read at its reversible pair's midpoint as well (round 12)

_BASE = {"solver.solver": "reversible", "solver.adjoint": "reversible", "solver.tol": 0.0,
         "solver.state_dtype": "float64", "model.init_state": "input", "solver.beta": 0.5, "solver.max_steps": 2,
         # pinned: the package's defaults before the equilibrium recipe (the recipe now sets all of these)
         "model.block_skip": "state", "objective.detached_steps": "0", "objective.fixed_point_penalty": 0.0,
         "objective.penalty_tail": 1.0, "objective.penalty_ramp": 0.0, "objective.next_iterate_loss": 0.0,
         "solver.inference_readout": "z"}
_INPUT_SKIP = {**_BASE, "model.block_skip": "input"}

_RECIPE = {**_INPUT_SKIP, "objective.detached_steps": "poisson-lognormal:6:24", "objective.fixed_point_penalty": 0.1}
_DEEP_START = {**_RECIPE, "objective.detached_steps": "poisson-lognormal:12:48"}
# name -> (label, settings overrides). Without tol (0 = never stop early) every step count is the drawn one.
# RETIRED (no overrides): a candidate whose option revdeq no longer has (issue 41: differentiated-step rules, the
# Jacobian penalty, random and perturbed starts, the output LayerNorm, bf16 graph-free steps). Its recorded runs
# stay in the report under its label; a new run of it is refused.
RETIRED = _study.RETIRED
MODELS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "base": ("today: 2 steps", _BASE),
    "uniform-1-4": ("uniform 1..4 steps", RETIRED),
    "pln-4": ("Poisson-lognormal steps, mean 4 (all differentiated)", RETIRED),
    "fixed-6": ("6 steps", {**_BASE, "solver.max_steps": 6}),
    "tol-0.1": ("to tol 0.1, at most 8 steps", {**_BASE, "solver.max_steps": 8, "solver.tol": 0.1}),
    "beta-0.8": ("2 steps, beta 0.8", {**_BASE, "solver.beta": 0.8}),
    "penalty-1": ("2 steps + fixed-point penalty 1", {**_BASE, "objective.fixed_point_penalty": 1.0}),
    "jacobian-0.1": ("2 steps + Jacobian penalty 0.1", RETIRED),
    "detach-u0-6": ("0..6 detached + 2 differentiated steps", {**_BASE, "objective.detached_steps": "uniform:0-6"}),
    "detach-pln-6": ("Poisson-lognormal (mean 6) detached + 2 differentiated",
                     {**_BASE, "objective.detached_steps": "poisson-lognormal:6:24"}),
    "detach-pln-6-penalty": ("PLN(6) detached + 2 differentiated + penalty 1",
                             {**_BASE, "objective.detached_steps": "poisson-lognormal:6:24",
                              "objective.fixed_point_penalty": 1.0}),
    "input-2": ("input skip, 2 steps", _INPUT_SKIP),
    "input-4": ("input skip, 4 steps", {**_INPUT_SKIP, "solver.max_steps": 4}),
    "input-penalty-1": ("input skip, 2 steps + penalty 1", {**_INPUT_SKIP, "objective.fixed_point_penalty": 1.0}),
    "input-detach-pln-6": ("input skip, PLN(6) detached + 2 differentiated",
                           {**_INPUT_SKIP, "objective.detached_steps": "poisson-lognormal:6:24"}),
    "input-detach-u0-6": ("input skip, 0..6 detached + 2 differentiated",
                          {**_INPUT_SKIP, "objective.detached_steps": "uniform:0-6"}),
    "input-detach-pln-6-penalty": ("input skip, PLN(6) detached + 2 differentiated + penalty 1",
                                   {**_INPUT_SKIP, "objective.detached_steps": "poisson-lognormal:6:24",
                                    "objective.fixed_point_penalty": 1.0}),
    "input-detach-pln-4": ("input skip, PLN(4) detached + 2 differentiated",
                           {**_INPUT_SKIP, "objective.detached_steps": "poisson-lognormal:4:16"}),
    "input-detach-pln-6-penalty-0.1": ("input skip, PLN(6) detached + 2 differentiated + penalty 0.1",
                                       {**_INPUT_SKIP, "objective.detached_steps": "poisson-lognormal:6:24",
                                        "objective.fixed_point_penalty": 0.1}),
    "input-detach-pln-6-penalty-0.3": ("input skip, PLN(6) detached + 2 differentiated + penalty 0.3",
                                       {**_INPUT_SKIP, "objective.detached_steps": "poisson-lognormal:6:24",
                                        "objective.fixed_point_penalty": 0.3}),
    "input-jacobian-1": ("input skip, 2 steps + Jacobian penalty 1", RETIRED),
    # round 2 (issue 20's residual target): the recipe (input skip, PLN(6) detached + 2, penalty 0.1) plus
    # Jacobian-norm regularisation, which classic DEQs use to make the iteration contract, or a smaller beta
    "recipe-jacobian-0.03": ("recipe + Jacobian penalty 0.03", RETIRED),
    "recipe-jacobian-0.1": ("recipe + Jacobian penalty 0.1", RETIRED),
    "recipe-jacobian-0.3": ("recipe + Jacobian penalty 0.3", RETIRED),
    "recipe-beta-0.3": ("recipe, beta 0.3", {**_RECIPE, "solver.beta": 0.3}),
    # round 3: 1.7% of positions (in runs of neighbours, e.g. "3.5." or "priv") orbit instead of settling and
    # decide res@32, while the median residual at 32 steps is 9e-4 (residual_positions.py, retired); PLN(6):24
    # reaches 24 steps in 0.3% of draws (step_rule_tail.py, retired), so training rarely sees those orbits
    "recipe-pln-12": ("recipe, PLN(12):48 detached", _DEEP_START),
    "recipe-pln-12-penalty-0.3": ("recipe, PLN(12):48 detached, penalty 0.3",
                                  {**_DEEP_START, "objective.fixed_point_penalty": 0.3}),
    "recipe-pln-12-penalty-1": ("recipe, PLN(12):48 detached, penalty 1",
                                {**_DEEP_START, "objective.fixed_point_penalty": 1.0}),
    # round 4: between 0.3 (res@32 0.012 / 0.030 on seeds 0 / 1) and 1 (0.017 / 0.024, perplexity +0.14)
    "recipe-pln-12-penalty-0.5": ("recipe, PLN(12):48 detached, penalty 0.5",
                                  {**_DEEP_START, "objective.fixed_point_penalty": 0.5}),
    # round 4: the deep tail at the default's cost. Poisson-lognormal with sigma 1 instead of 0.5 puts as much
    # mass past 24 steps as PLN(12):48 (6.2% / 3.4% against 7.0%) at a mean of 7.7 / 5.9 steps (12.0)
    "recipe-pln-8-sigma-1-penalty-0.3": ("recipe, PLN(8):48 sigma 1 detached, penalty 0.3",
                                         {**_RECIPE, "objective.detached_steps": "poisson-lognormal:8:48:1",
                                          "objective.fixed_point_penalty": 0.3}),
    "recipe-pln-6-sigma-1-penalty-0.3": ("recipe, PLN(6):48 sigma 1 detached, penalty 0.3",
                                         {**_RECIPE, "objective.detached_steps": "poisson-lognormal:6:48:1",
                                          "objective.fixed_point_penalty": 0.3}),
    # and a cheaper deep start than PLN(12): mean 10 (P(k >= 24) 3.5%), 2 fewer graph-free steps per batch
    "recipe-pln-10-penalty-0.3": ("recipe, PLN(10):48 detached, penalty 0.3",
                                  {**_RECIPE, "objective.detached_steps": "poisson-lognormal:10:48",
                                   "objective.fixed_point_penalty": 0.3}),
    # round 5: a depth curriculum at PLN(9)'s average cost (within the time budget), PLN(18) at the end of the
    # run: the deep start matters where the model settles, not in the first steps, where the state is noise
    "recipe-pln-0-18-penalty-0.3": ("recipe, PLN(0 -> 18):72 curriculum detached, penalty 0.3",
                                    {**_RECIPE, "objective.detached_steps": "poisson-lognormal:0-18:72",
                                     "objective.fixed_point_penalty": 0.3}),
    # and the deep start at the budget by differentiating 1 step instead of 2: a differentiated reversible step
    # costs about 8 evaluations of f (2 forward, 2 recomputed, 2 vector-Jacobian products), a detached one 2, so
    # PLN(12) + 1 costs ~35 f-evaluations per batch against the default's ~31 (PLN(12) + 2: ~43)
    "recipe-pln-12-1-step-penalty-0.3": ("recipe, PLN(12):48 detached + 1 differentiated, penalty 0.3",
                                         {**_DEEP_START, "solver.max_steps": 1,
                                          "objective.fixed_point_penalty": 0.3}),
    # round 6: path independence (Anil et al. 2022; the random initialisation of Equilibrium Reasoners, 2026):
    # each training solve starts from z0 + sigma * rms(x) * N(0, I), so the model is trained to reach its fixed
    # point from many starts; the positions that orbit from z0 = x (round 3) are what it should remove
    "recipe-noise-1": ("recipe + random start, sigma 1", RETIRED),
    "recipe-noise-2": ("recipe + random start, sigma 2", RETIRED),
    "recipe-pln-12-penalty-0.3-noise-1": ("recipe, PLN(12):48 detached, penalty 0.3 + random start, sigma 1", RETIRED),
    # and the noise where the differentiated steps start (the end of the graph-free steps; Equilibrium Reasoners'
    # path noise at one point of the path): the two exact steps must bring a perturbed state back to the fixed point
    "recipe-state-noise-0.5": ("recipe + perturbed restart, sigma 0.5", RETIRED),
    "recipe-pln-12-penalty-0.3-state-noise-0.5": ("recipe, PLN(12):48 detached, penalty 0.3 + perturbed restart, "
                                                  "sigma 0.5", RETIRED),
    # round 7: where normalisation sits (the "form of the block"): a LayerNorm on f's output
    "recipe-output-norm": ("recipe + output LayerNorm, f = LN_out(x + a + m)", RETIRED),
    # and with a stronger penalty: with the output norm the 32-step state is closer to a fixed point (res@32
    # 0.025 on both seeds) but reads worse than the 8-step one (1.046), so pull the trained state onto it
    "recipe-output-norm-penalty-0.3": ("recipe + output LayerNorm, penalty 0.3", RETIRED),
    "recipe-output-norm-penalty-1": ("recipe + output LayerNorm, penalty 1", RETIRED),
    # and on the deep start, whose curve is flat (round 3): does the output norm's smaller residual hold there?
    "recipe-pln-12-penalty-0.3-output-norm": ("recipe, PLN(12):48 detached, penalty 0.3 + output LayerNorm", RETIRED),
    # round 8: the orbiting positions (~1.7% of them, in runs of neighbours) decide res@32, and the penalty's mean
    # over all positions dilutes them: average it over only the worst fraction q (a CVaR)
    "recipe-tail-0.02": ("recipe, penalty 0.1 over the worst 2% of positions",
                         {**_RECIPE, "objective.penalty_tail": 0.02}),
    "recipe-tail-0.1": ("recipe, penalty 0.1 over the worst 10% of positions",
                        {**_RECIPE, "objective.penalty_tail": 0.1}),
    # the tail penalty's value is the worst positions' mean, which the weight has to balance against the loss anew
    **{f"recipe-tail-0.1-penalty-{lam:g}": (f"recipe, penalty {lam:g} over the worst 10% of positions",
                                             {**_RECIPE, "objective.fixed_point_penalty": lam,
                                              "objective.penalty_tail": 0.1})
       for lam in (0.3, 1.0, 0.2)},
    # the tail penalty's residual (0.005) with the deep start's flat curve (1.33x the default's cost)?
    "recipe-pln-12-tail-0.1-penalty-0.3": ("recipe, PLN(12):48 detached, penalty 0.3 over the worst 10%",
                                           {**_DEEP_START, "objective.fixed_point_penalty": 0.3,
                                            "objective.penalty_tail": 0.1}),
    # round 9: the same within the budget: PLN(10) costs ~39 evaluations of f per batch against PLN(12)'s ~43
    "recipe-pln-10-tail-0.1-penalty-0.3": ("recipe, PLN(10):48 detached, penalty 0.3 over the worst 10%",
                                           {**_RECIPE, "objective.detached_steps": "poisson-lognormal:10:48",
                                            "objective.fixed_point_penalty": 0.3,
                                            "objective.penalty_tail": 0.1}),
    # round 10: the same with its graph-free steps in bfloat16 (solver.train_detached_precision, since removed; on
    # this AMX CPU ~1.8x faster per detached step, ~10% per run): nothing reverses those steps, so their rounding
    # only moves where the exact steps start
    "recipe-pln-10-tail-0.1-penalty-0.3-bf16": ("recipe, PLN(10):48 detached in bf16, penalty 0.3 over the worst 10%",
                                                RETIRED),
    # round 10: the tail penalty 0.3 on the default's start failed seed 3 (6.85) while the model was far from any
    # fixed point: ramp both penalties in over the first 20% of the run (objective.penalty_ramp)
    "recipe-tail-0.1-penalty-0.3-ramp-0.2": ("recipe, penalty 0.3 over the worst 10%, ramped in over 20% of steps",
                                             {**_RECIPE, "objective.fixed_point_penalty": 0.3,
                                              "objective.penalty_tail": 0.1, "objective.penalty_ramp": 0.2}),
    # and the ramp on a slightly deeper start (PLN(10) was flat at 1.012 but over the time budget): mean 8, at most 32
    "recipe-pln-8-tail-0.1-penalty-0.3-ramp-0.2": ("recipe, PLN(8):32 detached, penalty 0.3 over the worst 10%, "
                                                   "ramped in over 20% of steps",
                                                   {**_RECIPE, "objective.detached_steps": "poisson-lognormal:8:32",
                                                    "objective.fixed_point_penalty": 0.3,
                                                    "objective.penalty_tail": 0.1,
                                                    "objective.penalty_ramp": 0.2}),
    "explicit-1": ("transformer, 1 layer (same parameters)", {"solver.solver": "explicit",
                                                              "model.num_hidden_layers": 1}),
}
# round 11: the readout trained one step past the solver's output as well, mu x the cross-entropy read at f(z_N)
# (the penalty's evaluation; next_iterate_screen.py, since retired, patched it in first, under these names)
for _base, _mu in (("recipe-tail-0.1-penalty-0.3-ramp-0.2", 1.0), ("recipe-pln-8-tail-0.1-penalty-0.3-ramp-0.2", 1.0),
                   ("recipe-tail-0.1-penalty-0.3-ramp-0.2", 2.0)):
    _label, _settings = MODELS[_base]
    MODELS[f"{_base}-next-iterate-{_mu:g}"] = (f"{_label}, + {_mu:g} x the cross-entropy read at f(z_N)",
                                               {**_settings, "objective.next_iterate_loss": _mu})
# with it the cross-entropy counts twice, so the penalty's weight relative to it halves; res@32 rose (0.03 on 3 of
# 4 runs): the penalty at 0.6 (the same relative weight as 0.3 before) and 1; round 12: 2 (res@32 of the no-options
# run was 0.061 at penalty 1); round 13: 3, aimed at the moonshot's res@32 <= 1e-3 (penalty 2: 0.0012 to 0.019)
for _lam in (0.6, 1.0, 2.0, 3.0):
    MODELS[f"recipe-tail-0.1-penalty-{_lam:g}-ramp-0.2-next-iterate-1"] = (
        f"recipe, penalty {_lam:g} over the worst 10%, ramped in over 20% of steps, + the cross-entropy read at f(z_N)",
        {**MODELS["recipe-tail-0.1-penalty-0.3-ramp-0.2-next-iterate-1"][1], "objective.fixed_point_penalty": _lam})
# and the deeper start under the new default (its res@32 was under 2e-2 on 3 seeds of 4, 0.034 on seed 0)
MODELS["recipe-pln-8-tail-0.1-penalty-1-ramp-0.2-next-iterate-1"] = (
    "recipe, PLN(8):32 detached, penalty 1 over the worst 10%, ramped in over 20% of steps, + the cross-entropy read "
    "at f(z_N)", {**MODELS["recipe-tail-0.1-penalty-1-ramp-0.2-next-iterate-1"][1],
               "objective.detached_steps": "poisson-lognormal:8:32"})
# round 13: the same recipe trained under bfloat16 autocast (`train.precision: bf16`; the solver's states stay
# float64, its gradient exact for the iteration as computed). On CPUs that multiply bfloat16 natively (AVX512-BF16
# or AMX) a training step is faster (1.6x measured on an AVX512-BF16 VM, README "Round 13"): is a bf16-trained
# model as good, read in float32?
MODELS["recipe-tail-0.1-penalty-2-ramp-0.2-next-iterate-1-bf16"] = (
    "recipe, penalty 2 over the worst 10%, ramped in over 20% of steps, + the cross-entropy read at f(z_N), trained "
    "under bf16 autocast",
    {**MODELS["recipe-tail-0.1-penalty-2-ramp-0.2-next-iterate-1"][1], "train.precision": "bf16"})
SCREEN_MODELS = [m for m, (_, overrides) in MODELS.items() if overrides is not RETIRED and m != "explicit-1"]
SCREEN_LR = 3e-3
LR_GRID = (2e-3, 3e-3, 4e-3)


class CurveRecorder(Callback):
    """Validation perplexity on the first batches every eval_every steps."""

    def __init__(self) -> None:
        self.curve: list[tuple[int, float]] = []

    def on_evaluation(self, trainer: Any, split: str, loss: float) -> None:
        if split == "validation-prefix":
            self.curve.append((trainer.step, math.exp(loss)))


def own_steps(ppl: dict[str, float]) -> int:
    """The inference steps a run would ship with: the smallest count (>= 1) within 1% of its best perplexity."""
    counts = [k for k in INFERENCE_STEPS if k >= 1 and str(k) in ppl]
    best = min(ppl[str(k)] for k in counts)
    return next(k for k in counts if ppl[str(k)] <= 1.01 * best)


def run_one(model: str, lr: float, steps: int, seed: int, curve_every: int, curve_batches: int) -> dict[str, Any]:
    """Train one candidate in this process and measure it (called in a fresh child process)."""
    import shutil

    import torch

    torch.set_num_threads(1)
    from revdeq_cli.settings import resolve_settings
    from revdeq_cli.training import loop
    from revdeq_cli.training.evaluate import evaluate_split

    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"revdeq-equilibrium-{os.getpid()}"
    values = {**RECIPE, **MODELS[model][1], "train.lr": lr, "train.max_steps": steps, "train.seed": seed,
              "train.warmup_steps": max(1, round(WARMUP_FRACTION * steps)), "train.eval_every": curve_every,
              "train.eval_batches": curve_batches, "train.out_dir": str(out_dir)}
    settings = resolve_settings(sets=[f"{k}={json.dumps(v)}" for k, v in values.items()], environ={})
    recorder = CurveRecorder()
    trainer = loop.Trainer(settings, info=loop.init_distributed("cpu")[0], device=torch.device("cpu"),
                           callbacks=[recorder])
    t0 = time.perf_counter()
    summary = trainer.run()
    wall = time.perf_counter() - t0
    net, corpus = trainer.model, trainer.corpus
    common = {"seq_len": settings.data.seq_len, "batch_size": 16}
    record: dict[str, Any] = {
        "model": model, "lr": lr, "steps": steps, "seed": seed, "train_seconds": summary.seconds,
        "wall_seconds": wall, "curve": recorder.curve, "final_val_ppl_trainer": math.exp(summary.final_val_loss),
        "machine": machine(),  # one seed trains differently on another CPU (its kernels round differently)
    }
    if net.config.is_deq:
        # the training depth (the rules' means, rounded up), which the trainer stores as the model's inference depth
        record["nominal_train_steps"] = net.config.eval_max_steps
        ppl, residual, seconds = {}, {}, {}
        for k in INFERENCE_STEPS:
            r = evaluate_split(net, corpus.splits["validation"], split_bytes=corpus.split_bytes["validation"],
                               solver_steps=k, **common)
            ppl[str(k)], residual[str(k)], seconds[str(k)] = r.perplexity, r.max_residual, r.seconds
        # residual over real positions (evaluate_split runs the padded tail window cut to its length)
        record.update(val_ppl_at=ppl, residual_at=residual, eval_seconds_at=seconds, residual_real_positions=True)
        record["own_steps"] = own_steps(ppl)
        record["val_ppl"] = ppl[str(record["own_steps"])]
        if net.config.solver == "reversible":  # round 12: the same model read at the pair's midpoint (y + z) / 2
            readout, net.config.inference_readout = net.config.inference_readout, "midpoint"
            midpoint = {str(k): evaluate_split(net, corpus.splits["validation"], solver_steps=k,
                                               split_bytes=corpus.split_bytes["validation"], **common)
                        for k in MIDPOINT_STEPS}
            net.config.inference_readout = readout
            record["midpoint_val_ppl_at"] = {k: r.perplexity for k, r in midpoint.items()}
            record["midpoint_residual_at"] = {k: r.max_residual for k, r in midpoint.items()}
        train_steps = record["nominal_train_steps"]
    else:
        record["val_ppl"] = math.exp(summary.final_val_loss)
        train_steps = None
    n_val = len(corpus.splits["validation"])
    train_part = corpus.splits["train"][:n_val]
    r = evaluate_split(net, train_part, split_bytes=corpus.split_bytes["validation"], solver_steps=train_steps,
                       split="train", **common)
    record["train_ppl"] = r.perplexity
    keep = os.environ.get("REVDEQ_EQUILIBRIUM_KEEP")  # a folder to keep each run's final model in, for probing
    if keep:
        dest = Path(keep) / f"{model}-lr{lr:g}-s{steps}-seed{seed}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree((out_dir / "final").resolve(), dest)
    shutil.rmtree(out_dir, ignore_errors=True)
    return record


# ---------------------------------------------------------------------------------------------- the study
def load_runs() -> list[dict[str, Any]]:
    return _study.load_runs(RUNS_FILE)


def _describe(record: dict[str, Any]) -> str:
    curve = " / ".join(f"{record.get('val_ppl_at', {}).get(str(k), math.nan):.2f}" for k in INFERENCE_STEPS)
    return f"ppl@{INFERENCE_STEPS} {curve} res@32 {record.get('residual_at', {}).get('32', math.nan):.2g}"


def run_many(jobs_list: list[tuple[str, float, int, int]], args: argparse.Namespace) -> None:
    here = _cpu({"machine": machine()})
    _study.run_missing(jobs_list, args, script=__file__, runs_file=RUNS_FILE, describe=_describe,
                       keep_env=("REVDEQ_EQUILIBRIUM_KEEP",),
                       done_on=(lambda r: _cpu(r) == here) if args.same_cpu else None)


def _cpu(run: dict[str, Any]) -> str:
    """The CPU a run trained on ("" for runs recorded before the runs file kept it)."""
    return run.get("machine", "").split(", torch")[0]


def best_per_model(runs: list[dict[str, Any]], steps: int) -> dict[tuple[str, str], dict[str, Any]]:
    """For each (model, CPU) at `steps`: the rate with the lowest mean val ppl (at each run's own steps) over its
    seeds. Runs of one model on different CPUs stay apart: the same seed trains to different figures on each."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for model in MODELS:
        for cpu in sorted({_cpu(r) for r in runs if r["model"] == model}):
            by_lr: dict[float, list[dict[str, Any]]] = {}
            for r in runs:
                if r["model"] == model and int(r["steps"]) == steps and _cpu(r) == cpu:
                    by_lr.setdefault(float(r["lr"]), []).append(r)
            if by_lr:
                out[(model, cpu)] = _best_rate(by_lr)
    return out


def _best_rate(by_lr: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    lr = min(by_lr, key=lambda g: statistics.mean(r["val_ppl"] for r in by_lr[g]))
    vals = [r["val_ppl"] for r in by_lr[lr]]
    return {"lr": lr, "runs": by_lr[lr], "mean": statistics.mean(vals),
            "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else None,
            "grid": {g: statistics.mean(r["val_ppl"] for r in rs) for g, rs in sorted(by_lr.items())}}


def _mean_at(runs: list[dict[str, Any]], field: str, k: int) -> float:
    values = [r[field][str(k)] for r in runs if field in r]
    return statistics.mean(values) if values else math.nan


def criteria(run: dict[str, Any]) -> tuple[float, bool, bool]:
    """(worst ppl from own steps to 32 / ppl at own steps, flat within 1.02x and res@32 <= 2e-2, moonshot)."""
    ppl, own = run["val_ppl_at"], run["own_steps"]
    later = [ppl[str(k)] for k in INFERENCE_STEPS if k >= own]
    worst = max(later) / ppl[str(own)]
    flat = worst <= 1.02 and run["residual_at"]["32"] <= 2e-2
    moon = min(ppl["8"], ppl["16"]) <= 0.95 * ppl["2"] and run["residual_at"]["32"] <= 1e-3
    return worst, flat, moon


def report(args: argparse.Namespace) -> str:
    runs = [r for r in load_runs() if "failed" not in r and math.isfinite(r.get("val_ppl", math.inf))]
    head = " | ".join(f"{k}" for k in INFERENCE_STEPS)
    lines = ["# Equilibrium study", "", f"Report made on: {machine()}. Each row trained on the CPU it names (runs "
             "recorded before the runs file kept the CPU: 2-core Intel Xeon or AMD EPYC VMs, torch 2.13.0+cpu).", "",
             "`python studies/equilibrium.py screen` / `confirm` / `run` / `report`. pydoc, byte tokenizer, tiny "
             "width (128, 4 heads, MLP 512, 128-token context), batch 16, AdamW (weight decay 0.1), cosine schedule "
             f"with {WARMUP_FRACTION:.0%} warmup, clipping 1.0, fp32 unless a row names bf16, one torch thread per "
             "run, RevDEQ beta 0.5, "
             "z0 = x unless named. Validation perplexity (bytes) on the whole validation split after training at 0 "
             "(z = z0) to 32 inference solver steps; `res@32` the largest relative residual at 32 steps; "
             "`own` the smallest step count within 1% of the run's best; `worst/own` the largest perplexity from own "
             "to 32 steps over that at own (the target: <= 1.02 with res@32 <= 2e-2); train ppl on a validation-sized "
             "prefix of the training split at the nominal training depth. Each model at its own best rate of the "
             "grid it ran (mean over seeds; per-rate means listed); s/run = training wall time (shared machine: "
             "`--jobs` runs on 2 cores).", ""]
    for steps in sorted({int(r["steps"]) for r in runs}):
        best = best_per_model(runs, steps)
        lines += [f"## {steps} optimiser steps", "",
                  f"| model | lr | ppl @ {head} | res@32 | own | ppl @ own | worst/own | train ppl | seeds | "
                  "ppl per lr | s/run |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for (model, cpu), b in sorted(best.items(), key=lambda kv: kv[1]["mean"]):
            rs = b["runs"]
            spread = f" ± {b['spread']:.2f}" if b["spread"] is not None else ""
            grid = ", ".join(f"{g:g}: {v:.2f}" for g, v in b["grid"].items())
            secs = statistics.mean(r.get("train_seconds", math.nan) for r in rs)
            train = statistics.mean(r.get("train_ppl", math.nan) for r in rs)
            if "val_ppl_at" in rs[0]:
                curve = " / ".join(f"{_mean_at(rs, 'val_ppl_at', k):.2f}" for k in INFERENCE_STEPS)
                res = f"{max(r['residual_at']['32'] for r in rs):.2g}"
                if not all(r.get("residual_real_positions") for r in rs):
                    res += "*"  # measured before evaluate_split left padding out: the tail window's pad positions
                if all("midpoint_residual_at" in r for r in rs):
                    res += f" (m: {max(r['midpoint_residual_at']['32'] for r in rs):.2g})"
                own = "/".join(sorted({str(r["own_steps"]) for r in rs}))
                worst = f"{max(criteria(r)[0] for r in rs):.3f}"
            else:
                curve, res, own, worst = "(explicit)", "-", "-", "-"
            label = MODELS[model][0] + (f" [{cpu}]" if cpu else "")
            lines.append(f"| {label} | {b['lr']:g} | {curve} | {res} | {own} | {b['mean']:.2f}{spread} | "
                         f"{worst} | {train:.2f} | {len(rs)} | {grid} | {secs:.0f} |")
        lines.append("")
    lines += ["`*`: res@32 measured with the split's padded tail window in the solve, so padding positions (the pad "
              "token repeated, never trained on) decide it; later runs cut that window to its length (real positions "
              "only; perplexity unchanged). `(m: ...)`: res@32 of the same model read at its reversible pair's "
              "midpoint (y + z) / 2 (`inference_readout: midpoint`, round 12; the runs before it did not measure it: "
              "`studies/two_cycles.py` does, on a kept model).", ""]
    text = "\n".join(lines)
    (RESULTS_DIR / "equilibrium.md").write_text(text + "\n")
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
    best = {m: b for m, b in best_per_model(runs, steps).items() if "val_ppl_at" in b["runs"][0]}
    if not best:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [k for k in INFERENCE_STEPS if k >= 1]
    for (model, cpu), b in sorted(best.items(), key=lambda kv: kv[1]["mean"]):
        ax.plot(xs, [_mean_at(b["runs"], "val_ppl_at", k) for k in xs], marker="o",
                label=f"{MODELS[model][0]}{f' [{cpu}]' if cpu else ''} (lr {b['lr']:g})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inference solver steps")
    ax.set_ylabel("validation perplexity (byte)")
    ax.set_title(f"Equilibrium study, {steps} optimiser steps: perplexity vs inference steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(RESULTS_DIR / "equilibrium_inference_steps.png", bbox_inches="tight", dpi=110)


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
    p.add_argument("--same-cpu", action="store_true",
                   help="count only runs recorded on this CPU as done (rerun the others here, to compare on one CPU)")
    args = p.parse_args(argv)
    if args.action == "child":
        print(json.dumps(run_one(**json.loads(args.spec))))
        return 0
    models = _study.chosen_models(p, args, MODELS, SCREEN_MODELS)
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else list(LR_GRID)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.action == "screen":
        lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else [SCREEN_LR]
        run_many([(m, lr, args.steps or 600, 0) for m in models for lr in lrs], args)
    elif args.action == "confirm":
        steps = args.steps or 1200
        run_many([(m, lr, steps, 0) for m in models for lr in lrs], args)
        here = _cpu({"machine": machine()})
        best = {m: b for (m, cpu), b in best_per_model(load_runs(), steps).items() if cpu in ("", here)}
        run_many([(m, best[m]["lr"], steps, s) for m in models if m in best for s in (seeds if seeds != [0] else [1])],
                 args)
    elif args.action == "run":
        run_many([(m, lr, args.steps or 600, s) for m in models for lr in lrs for s in seeds], args)
    print(report(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
