"""RevDEQ against a classic DEQ and explicit transformers where data is not the limit (issue 42): the `stdlib`
corpus (~10.6M byte tokens of training data, more than any run here reads), every model at its own best learning
rate, compared at equal training tokens and at equal training time.

    python benchmarks/datarich.py                      # the whole study (hours on 2 cores), then the report
    python benchmarks/datarich.py screen               # one stage at a time: screen, confirm, equal-time
    python benchmarks/datarich.py report               # rebuild the report from the runs file, running nothing
    python benchmarks/datarich.py --smoke --out-dir /tmp/datarich-smoke   # the protocol end to end, < 1 minute

The models (tiny width 128, 4 heads, MLP 512; byte tokenizer; context 128; batch 16 x 128 for every model):

    revdeq-paper             `train.recipe=paper` (z0 = 0, state-skip block, the exact reversible gradient
                             through every step, at most 4; no penalty; z_N readout), at batch 16 like the others
    revdeq-equilibrium       `train.recipe=equilibrium` (the default recipe)
    deq-implicit             classic DEQ: Anderson (m 5, 8 steps), implicit gradient, the same block
                             (compare.py's `deq-implicit`)
    transformer-1            an explicit transformer with 1 layer: the DEQs' parameters exactly
    transformer-deep         an explicit transformer of the same width with D layers, D = the evaluations of the
                             block per token the RevDEQ (equilibrium) makes forward in training: the same compute
    transformer-deep-narrow  D layers at the width whose non-embedding parameters are closest to the RevDEQ's
                             (same heads, MLP 4x width; compare.py's `explicit-9-narrow` rule)

The depth rule (`training_depth`): the equilibrium recipe runs k graph-free solver steps (k drawn per optimiser step
from its `objective.detached_steps` rule, mean E[k]) and then N differentiated steps (`solver.max_steps`); the
Reversible solver evaluates the block once for its start and twice per step, so one training forward evaluates
it 1 + 2 (N + E[k]) times per token: 1 + 2 x (2 + 6) = 17 at the tiny preset. E[k] is the rule's mean before its
clip (at 24, which lowers the mean by under 0.01), and N is an upper bound (tol 1e-3 may stop a batch earlier);
the measured evaluations are in the tables.

The protocol, each stage a subcommand (`all`, the default, runs the three in order, then `report`):

    screen      every model at every learning rate of one shared grid (--lrs, default 1e-3 2e-3 4e-3 8e-3) for
                --screen-steps (1200) optimiser steps, seed --seeds[0]; each model's best lr is the one with the
                lowest final validation perplexity (the whole validation split)
    confirm     every model at its best lr for --steps (3000 = 6.1M tokens, under one epoch of stdlib), seed
                --seeds[0]; then the other --seeds for the --top (3) models by that perplexity, and for the
                RevDEQ's best recipe whatever its rank. Recorded: the validation curve (--eval-points points on
                the first --eval-batches validation batches), the final perplexity on the whole validation split,
                tokens/s, peak memory, block evaluations per token (training forward / backward; at inference),
                and for the DEQs the perplexity at 1, 2, 4, 8, 16, 32, 64 inference steps (--inference-steps)
                with the largest final residual
    equal-time  every model at its best lr (seed --seeds[0]) for the training wall time the RevDEQ (equilibrium)
                confirm run took at its best lr; its own equal-time figure is that confirm run
    report      `<out-dir>/datarich.md` (a table per stage, the CPU, the verdict of issue 42 and a sentence of where
                the RevDEQ loses and by how much, both computed from the numbers), `datarich.json` (one record per
                model, in the order above) and `datarich_val_ppl.png` (needs matplotlib, as compare.py)

Every run is appended to `<out-dir>/datarich-runs.jsonl` as it finishes (its stage, model, lr, seed, length, the
protocol, the CPU and the command), and a run already there under the same protocol is not run again, so a study can
be stopped and continued; `report` reads only that file. Reports take the same data and size flags as the study
(they select the runs of that protocol).

What is fixed, what is measured (compare.py's machinery: `BudgetRun`, `train_one`, a fresh process per run):
the same data, batch, blocks in the same order for a seed, and optimiser for every model: AdamW (weight decay
0.1, betas 0.9 / 0.99), gradient clipping at 1.0, linear warmup over the first --warmup (5%) of the run, then a
cosine decay to 0.1x, in optimiser steps (screen, confirm) or in training seconds (equal time). A recipe sets how
its model solves and trains (model, solver, objective), not the optimiser: only the learning rate is per model,
and it is screened. Time is the wall time of the training steps (validation excluded), one torch thread per run
(--threads). Peak memory is compare.py's: the increase of the process's peak RSS over what it held before the first
step (CUDA: max allocated), in a fresh process per run; not measured for runs made --in-process. Block
evaluations per token: every evaluation of the block processes every token, so the evaluations per training step
(forward: `out.solver_nfe`; backward: `out.solver_backward.nfe`; an explicit model's L layers once each way by
autograd) are the evaluations per token; at inference one eval-mode forward at the model's own inference settings.

--smoke runs the whole protocol on a fake standard library (a few generated .py files in `<out-dir>/fake-stdlib`,
via REVDEQ_STDLIB_DIR, with the token cache in `<out-dir>/cache`): width 32, 2 heads, context 32, batch 4, a 2-value
lr grid, 3 screen and 5 confirm steps, the screen and equal-time runs in this process (the confirm runs each in a
fresh one, as in the study, so their peak memory is measured); it never writes into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402  (benchmarks/compare.py: the training machinery)

NAME = "datarich"
RUNS_FILE = f"{NAME}-runs.jsonl"
MODEL_NAMES = ("revdeq-paper", "revdeq-equilibrium", "deq-implicit", "transformer-1", "transformer-deep",
               "transformer-deep-narrow")
REVDEQS = ("revdeq-paper", "revdeq-equilibrium")
STAGES = ("screen", "confirm", "equal-time")
PROTOCOL_KEYS = ("dataset", "tokenizer", "preset", "hidden_size", "heads", "seq_len", "batch_size", "warmup",
                 "eval_points", "eval_batches", "inference_steps", "threads", "device", "precision")


# ---------------------------------------------------------------------------------------------------- models
def training_depth(preset: str) -> tuple[int, str]:
    """The explicit depth of the same compute as the RevDEQ (equilibrium) in training, and the rule in words:
    1 + 2 x (N differentiated + E[k] graph-free steps) forward evaluations of the block per token."""
    from revdeq_cli.model.step_rule import StepRule
    from revdeq_cli.recipes import recipe_values

    values = recipe_values("equilibrium", preset)
    n = int(values["solver.max_steps"])
    mean = StepRule.parse(values["objective.detached_steps"], field="objective.detached_steps", minimum=0).mean_at(1.0)
    depth = round(1 + 2 * (n + mean))
    return depth, f"1 + 2 x ({n} differentiated + {mean:g} mean graph-free steps) = {depth}"


def model_specs(preset: str) -> dict[str, compare.ModelSpec]:
    """The six contenders as compare.py `ModelSpec`s (module docstring)."""
    depth, _ = training_depth(preset)
    deep = {"solver": "explicit", "num_hidden_layers": depth}
    return {
        "revdeq-paper": compare.ModelSpec("RevDEQ, paper recipe", {}, settings={"train.recipe": "paper"}),
        "revdeq-equilibrium": compare.ModelSpec("RevDEQ, equilibrium recipe", {},
                                                settings={"train.recipe": "equilibrium"}),
        "deq-implicit": compare.MODELS["deq-implicit"],
        "transformer-1": compare.MODELS["explicit-1"],
        "transformer-deep": compare.ModelSpec(f"Transformer, {depth} layers", deep),
        "transformer-deep-narrow": compare.ModelSpec(f"Transformer, {depth} layers, narrow", deep,
                                                     match_params_layers=depth),
    }


# ---------------------------------------------------------------------------------------------------- runs
def protocol(opts: argparse.Namespace) -> dict[str, Any]:
    """What every run of one study shares; runs under another protocol are neither reused nor reported."""
    return {k: getattr(opts, k) for k in PROTOCOL_KEYS}


def run_key(stage: str, model: str, lr: float, seed: int, steps: int | None, seconds: float | None,
            proto: dict[str, Any]) -> str:
    return json.dumps([stage, model, float(lr), int(seed), steps, seconds, proto], sort_keys=True)


def record_key(record: dict[str, Any]) -> str:
    return run_key(record["stage"], record["model"], record["lr"], record["seed"], record["steps"],
                   record["budget_seconds"], record["protocol"])


def load_runs(path: Path, proto: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs recorded in `path` under protocol `proto`, in the order they finished."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in runs if r["protocol"] == proto]


def run_args(opts: argparse.Namespace, lr: float, seed: int, steps: int | None, seconds: float | None,
             in_process: bool = True):
    """compare.py's arguments for one run: the study's protocol, `lr`, `seed`, and a budget of `steps` optimiser
    steps or `seconds` of training time; `in_process` False: compare.run_task trains in a fresh process."""
    args = compare.parse_args([])
    vars(args).update({k: getattr(opts, k) for k in PROTOCOL_KEYS})
    vars(args).update(lr=lr, seed=seed, budget=seconds or 0.0, budget_steps=steps, in_process=in_process,
                      dataset_config=None, final_eval_batches=None, argv=None)
    return args


class Study:
    """The runs of one study: those in the runs file under this protocol, and running the missing ones."""

    def __init__(self, opts: argparse.Namespace, log=print, *, specs: dict[str, compare.ModelSpec] | None = None,
                 runs_file: str = RUNS_FILE) -> None:
        """`specs`, `runs_file`: another study's models and runs file under this protocol (studies/datarich_recipe.py);
        default: the six models and `datarich-runs.jsonl` in `opts.out_dir`."""
        self.opts, self.log = opts, log
        self.path = Path(opts.out_dir) / runs_file
        self.proto = protocol(opts)
        self.specs = model_specs(opts.preset) if specs is None else specs
        self.runs = load_runs(self.path, self.proto)
        self.machine = compare.machine_description(opts.device)

    def find(self, stage: str, model: str, lr: float, seed: int, steps: int | None = None,
             seconds: float | None = None) -> dict[str, Any] | None:
        key = run_key(stage, model, lr, seed, steps, seconds, self.proto)
        return next((r for r in self.runs if record_key(r) == key), None)

    def run(self, stage: str, model: str, lr: float, seed: int, *, steps: int | None = None,
            seconds: float | None = None) -> dict[str, Any]:
        """The run's record: from the runs file, or trained now (compare.run_task) and appended to it."""
        found = self.find(stage, model, lr, seed, steps, seconds)
        if found is not None:
            return found
        length = f"{steps} steps" if steps else f"{seconds:.1f} s"
        self.log(f"{stage}: {model} lr {lr:g} seed {seed}, {length} ...")
        task = {"kind": "train", "name": model, "spec": asdict(self.specs[model])}
        result = compare.run_task(task, run_args(self.opts, lr, seed, steps, seconds,
                                                 in_process=stage in self.opts.in_process))
        record = {"stage": stage, "model": model, "lr": float(lr), "seed": int(seed), "steps": steps,
                  "budget_seconds": seconds, "protocol": self.proto, "machine": self.machine,
                  "cpu": self.machine.split(", torch")[0], "command": self.opts.command,
                  "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "result": result}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.runs.append(record)
        self.log(f"  {result['steps']} steps in {result['train_seconds']:.1f} s, val ppl {ppl_of(record):.2f}"
                 + (f"; DIVERGED: {result['diverged']}" if result["diverged"] else ""))
        return record


def ppl_of(record: dict[str, Any] | None) -> float:
    """A run's final validation perplexity (whole split); inf for a missing or diverged run."""
    if record is None or record["result"]["diverged"]:
        return math.inf
    value = record["result"]["final_val_ppl"]
    return value if math.isfinite(value) else math.inf


# ---------------------------------------------------------------------------------------------------- stages
def screened(study: Study, model: str) -> dict[float, float]:
    """lr -> final validation perplexity of the model's screen runs (the grid and any extension of it)."""
    o = study.opts
    return {r["lr"]: ppl_of(r) for r in study.runs if r["stage"] == "screen" and r["model"] == model
            and r["seed"] == o.seeds[0] and r["steps"] == o.screen_steps}


def screen_lrs(study: Study) -> list[float]:
    """The grid and every extension any of the study's models was screened at, ascending."""
    return sorted(set(study.opts.lrs).union(*(screened(study, m) for m in study.specs)))


def best_lr(study: Study, model: str) -> float | None:
    """The screened lr with the lowest final validation perplexity (None: not screened yet)."""
    scored = [(ppl, lr) for lr, ppl in screened(study, model).items() if math.isfinite(ppl)]
    return min(scored)[1] if scored else None


def _need_lr(study: Study, model: str) -> float:
    lr = best_lr(study, model)
    if lr is None:
        raise SystemExit(f"{model}: no finished screen run at --lrs {study.opts.lrs}; run the screen stage first")
    return lr


def stage_screen(study: Study) -> None:
    """Every model at every lr of the grid; a model whose best lr is at an end of what it was screened at is
    screened a factor 2 further out, until its best is inside (the same rule for every model), at most
    --grid-extensions times."""
    o = study.opts
    for model in o.models:
        for lr in o.lrs:
            study.run("screen", model, lr, o.seeds[0], steps=o.screen_steps)
        for _ in range(o.grid_extensions):
            best, tried = best_lr(study, model), sorted(screened(study, model))
            if best is None or len(tried) < 2 or tried[0] < best < tried[-1]:
                break
            study.run("screen", model, best * 2 if best == tried[-1] else best / 2, o.seeds[0], steps=o.screen_steps)


def confirm_runs(study: Study, model: str) -> list[dict[str, Any]]:
    """The model's confirm runs at its best lr, one per seed found."""
    o, lr = study.opts, best_lr(study, model)
    if lr is None:
        return []
    found = [study.find("confirm", model, lr, seed, o.steps) for seed in o.seeds]
    return [r for r in found if r is not None]


def revdeq_best(values: dict[str, float]) -> str | None:
    """The RevDEQ recipe with the lower figure in `values` (None if neither has one)."""
    have = [m for m in REVDEQS if math.isfinite(values.get(m, math.inf))]
    return min(have, key=lambda m: values[m]) if have else None


def stage_confirm(study: Study) -> None:
    o = study.opts
    first = {m: study.run("confirm", m, _need_lr(study, m), o.seeds[0], steps=o.steps) for m in o.models}
    ranked = sorted(o.models, key=lambda m: ppl_of(first[m]))
    chosen = set(ranked[:o.top]) | {revdeq_best({m: ppl_of(first[m]) for m in first})} - {None}
    for model in [m for m in o.models if m in chosen]:
        for seed in o.seeds[1:]:
            study.run("confirm", model, _need_lr(study, model), seed, steps=o.steps)


def equal_time_budget(study: Study) -> float | None:
    """The training seconds of the RevDEQ (equilibrium) confirm run at its best lr, first seed."""
    lr = best_lr(study, "revdeq-equilibrium")
    ref = lr and study.find("confirm", "revdeq-equilibrium", lr, study.opts.seeds[0], study.opts.steps)
    return ref["result"]["train_seconds"] if ref else None


def equal_time_run(study: Study, model: str) -> dict[str, Any] | None:
    """The model's equal-time run (the RevDEQ (equilibrium)'s: its confirm run); None if not run yet."""
    o, lr, seconds = study.opts, best_lr(study, model), equal_time_budget(study)
    if lr is None or seconds is None:
        return None
    if model == "revdeq-equilibrium":
        return study.find("confirm", model, lr, o.seeds[0], o.steps)
    return study.find("equal-time", model, lr, o.seeds[0], seconds=seconds)


def stage_equal_time(study: Study) -> None:
    seconds = equal_time_budget(study)
    if seconds is None:
        raise SystemExit("equal-time needs the RevDEQ (equilibrium) confirm run; run the confirm stage first")
    for model in study.opts.models:
        if model != "revdeq-equilibrium":
            study.run("equal-time", model, _need_lr(study, model), study.opts.seeds[0], seconds=seconds)


# ---------------------------------------------------------------------------------------------------- summary
def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.inf


def model_summary(study: Study, model: str) -> dict[str, Any]:
    """One model's record in datarich.json: its screen, its confirm runs (figures of the first seed, perplexity
    over all seeds) and its equal-time run. Missing figures are None."""
    confirms, timed = confirm_runs(study, model), equal_time_run(study, model)
    first = confirms[0]["result"] if confirms else None
    ppl = screened(study, model)
    screen = {f"{lr:g}": _finite(ppl.get(lr, math.inf)) for lr in screen_lrs(study)}
    out: dict[str, Any] = {"model": model, "label": study.specs[model].label, "best_lr": best_lr(study, model),
                           "screen_val_ppl": screen}
    seeds_ppl = [ppl_of(r) for r in confirms]
    out.update(val_ppl_equal_tokens=_finite(_mean(seeds_ppl)), val_ppl_equal_tokens_seeds=
               {str(r["seed"]): _finite(ppl_of(r)) for r in confirms},
               val_ppl_equal_time=_finite(ppl_of(timed)))
    keys = ("params", "params_non_embedding", "hidden_size", "layers", "tokens", "seconds", "steps", "tokens_per_sec",
            "peak_mib", "train_fwd_evals_per_token", "train_bwd_evals_per_token", "inference_evals_per_token")
    out.update(dict.fromkeys(keys))
    if first is not None:
        layers = first["config"]["num_hidden_layers"] if first["explicit_layers"] else 1
        peak = first["peak_memory_bytes"]
        out.update(params=first["params_total"], params_non_embedding=first["params_non_embedding"],
                   hidden_size=first["config"]["hidden_size"], layers=layers, tokens=first["tokens"],
                   seconds=first["train_seconds"], steps=first["steps"], tokens_per_sec=first["tokens_per_sec"],
                   peak_mib=None if peak is None else peak / 2**20, train_fwd_evals_per_token=first["fwd_nfe"],
                   train_bwd_evals_per_token=first["bwd_nfe"] if first["bwd_nfe"] is not None else layers,
                   inference_evals_per_token=first.get("inference_nfe"))
    out.update(inference_sweep=first["inference_sweep"] if first else [], curve=first["curve"] if first else [],
               equal_time_seconds=timed["result"]["train_seconds"] if timed else None,
               equal_time_steps=timed["result"]["steps"] if timed else None,
               equal_time_tokens=timed["result"]["tokens"] if timed else None,
               equal_time_curve=timed["result"]["curve"] if timed else [],
               cpu=sorted({r["cpu"] for r in [*confirms, *([timed] if timed else [])]}))
    return out


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (None in their place)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- verdict
def _ppl(records: dict[str, dict[str, Any]], model: str, key: str) -> float:
    value = records.get(model, {}).get(key)
    return math.inf if value is None else value


def loses_sentence(records: dict[str, dict[str, Any]], key: str, where: str) -> str:
    """Where the RevDEQ's best recipe loses at `where` (figures `key`), and by how much, from the numbers."""
    ppl = {m: _ppl(records, m, key) for m in records}
    best = revdeq_best(ppl)
    if best is None:
        return f"At {where}: no RevDEQ result yet."
    ahead = sorted((p, m) for m, p in ppl.items() if m not in REVDEQS and p < ppl[best])
    head = f"At {where}, the RevDEQ's best recipe (`{best}`, validation perplexity {ppl[best]:.2f})"
    if not ahead:
        return f"{head} loses to no model it was compared with."
    return f"{head} loses to " + ", ".join(
        f"`{m}` ({p:.2f}: the RevDEQ's is {100 * (ppl[best] / p - 1):.1f}% higher)" for p, m in ahead) + "."


def verdict_lines(records: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's three criteria, each met, not met or undecided (a figure missing), with its numbers."""
    tok = {m: _ppl(records, m, "val_ppl_equal_tokens") for m in records}
    tim = {m: _ppl(records, m, "val_ppl_equal_time") for m in records}
    best_tok, best_tim = revdeq_best(tok), revdeq_best(tim)
    t1, td, dq = tok.get("transformer-1", math.inf), tok.get("transformer-deep", math.inf), \
        tim.get("deq-implicit", math.inf)

    def said(ok: bool | None) -> str:
        return "undecided (a figure is missing)" if ok is None else "**met**" if ok else "**not met**"

    ok = None
    target = min(t1, (t1 + td) / 2)
    if best_tok and math.isfinite(t1) and math.isfinite(td):
        ok = tok[best_tok] <= target
    r = f"{tok[best_tok]:.2f} (`{best_tok}`)" if best_tok else "n/a"
    lines = [f"- Goal, equal tokens: the RevDEQ's best recipe at or below `transformer-1` ({t1:.2f}) and at least "
             f"halfway from it to `transformer-deep` ({td:.2f}), i.e. at most {target:.2f}: RevDEQ {r}: {said(ok)}."]
    ok = None
    ratio = math.nan
    if best_tok and math.isfinite(td):
        ratio = records["transformer-deep"]["params"] / records[best_tok]["params"]
        ok = tok[best_tok] <= td and ratio >= 5
    lines.append(f"- Moonshot: `transformer-deep`'s perplexity ({td:.2f}) with at least 5x fewer parameters: RevDEQ "
                 f"{r} with {ratio:.1f}x fewer parameters (total): {said(ok)}.")
    ok = tim[best_tim] < dq if best_tim and math.isfinite(dq) else None
    r = f"{tim[best_tim]:.2f} (`{best_tim}`)" if best_tim else "n/a"
    lines.append(f"- Equal time: ahead of `deq-implicit` ({dq:.2f}): RevDEQ {r}: {said(ok)}.")
    return lines


# ---------------------------------------------------------------------------------------------------- report
def _f(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def _stage_tables(study: Study, records: dict[str, dict[str, Any]]) -> list[str]:
    o, lrs = study.opts, screen_lrs(study)
    lines = ["", f"## Screen: final validation perplexity after {o.screen_steps} steps (seed {o.seeds[0]})", "",
             "The grid is shared; a model whose best lr is at the grid's end is screened a factor 2 further out "
             "(— : not run).", "",
             "| model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
             "|---|" + "---:|" * (len(lrs) + 1)]
    for m, rec in records.items():
        lines.append(f"| `{m}` | " + " | ".join(_f(v) for v in rec["screen_val_ppl"].values())
                     + f" | {_f(rec['best_lr'], 'g')} |")
    tokens = o.steps * o.batch_size * o.seq_len
    lines += ["", f"## Equal training tokens: {o.steps} steps ({tokens / 1e6:.2f}M tokens), each model at its best lr",
              "", "Validation perplexity on the whole validation split (mean over the seeds run; each seed in "
              "brackets). Time, memory and evaluations from the first seed's run.", "",
              "| model | params (non-emb.) | width x layers | lr | val ppl (seeds) | tokens | train s | tokens/s | "
              "peak MiB | block evals/token, training fwd / bwd | at inference |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in records.items():
        if r["params"] is None:
            lines.append(f"| `{m}` | not run yet |" + " |" * 10)
            continue
        seeds = ", ".join(f"{s}: {_f(v)}" for s, v in r["val_ppl_equal_tokens_seeds"].items())
        lines.append(
            f"| `{m}` | {compare._fmt_count(r['params'])} ({compare._fmt_count(r['params_non_embedding'])}) | "
            f"{r['hidden_size']} x {r['layers']} | {r['best_lr']:g} | {_f(r['val_ppl_equal_tokens'])} ({seeds}) | "
            f"{r['tokens']} | {_f(r['seconds'], '.1f')} | {_f(r['tokens_per_sec'], '.0f')} | {_f(r['peak_mib'], '.0f')}"
            f" | {_f(r['train_fwd_evals_per_token'], '.1f')} / {_f(r['train_bwd_evals_per_token'], '.1f')} | "
            f"{r['inference_evals_per_token'] if r['inference_evals_per_token'] is not None else '—'} |")
    sweeps = {m: r["inference_sweep"] for m, r in records.items() if r["inference_sweep"]}
    if sweeps:
        steps = [row["steps"] for row in next(iter(sweeps.values()))]
        lines += ["", "## DEQs: validation perplexity vs inference steps (the first seed's confirm run)", "",
                  f"On the first {o.eval_batches} validation batches, `inference_max_steps` set to each value (no "
                  "early stop); in brackets the largest final relative residual.", "",
                  "| model | " + " | ".join(f"{k} steps" for k in steps) + " |", "|---|" + "---:|" * len(steps)]
        for m, rows in sweeps.items():
            lines.append(f"| `{m}` | " + " | ".join(f"{_f(x['ppl'])} ({_f(x['max_residual'], '.1e')})" for x in rows)
                         + " |")
    seconds = equal_time_budget(study)
    lines += ["", f"## Equal training time: {_f(seconds, '.1f')} s (the RevDEQ (equilibrium)'s confirm run)", "",
              "Each model at its best lr, seed 0, schedule in training seconds; `revdeq-equilibrium`'s row is its "
              "confirm run.", "", "| model | lr | steps | tokens | val ppl |", "|---|---:|---:|---:|---:|"]
    for m, r in records.items():
        lines.append(f"| `{m}` | {_f(r['best_lr'], 'g')} | {r['equal_time_steps'] or '—'} | "
                     f"{r['equal_time_tokens'] or '—'} | {_f(r['val_ppl_equal_time'])} |")
    return lines


def markdown(study: Study, records: dict[str, dict[str, Any]]) -> str:
    o, runs = study.opts, study.runs
    cpus = sorted({r["cpu"] for r in runs}) or ["(no runs yet)"]
    commands = list(dict.fromkeys(r["command"] for r in runs if r["command"]))
    dates = sorted(r["date"] for r in runs)
    _, rule = training_depth(o.preset)
    lines = [
        f"# {NAME}: RevDEQ vs a classic DEQ vs explicit transformers where data is not the limit (issue 42)", "",
        f"- CPU: {'; '.join(cpus)}; one torch thread per run ({o.threads}), device `{o.device}`, {o.precision}.",
        f"- Data: `{o.dataset}`, tokenizer `{o.tokenizer}`, context {o.seq_len}, batch {o.batch_size} x {o.seq_len}; "
        f"preset `{o.preset}`" + (f", width {o.hidden_size}, {o.heads} heads" if o.hidden_size else "") + ".",
        f"- Optimiser (every model): AdamW, weight decay 0.1, betas 0.9 / 0.99, clip 1.0; warmup {o.warmup:.0%} then "
        "cosine to 0.1x. Only the lr is per model, screened on one grid; the recipes set model, solver, objective.",
        f"- `transformer-deep` depth: the RevDEQ (equilibrium)'s forward evaluations per token in training, {rule}.",
        f"- Runs: {len(runs)} in `{RUNS_FILE}`" + (f", {dates[0]} to {dates[-1]}" if dates else "") + ".",
        *[f"- Command: `{c}`" for c in commands],
    ]
    lines += _stage_tables(study, records)
    lines += ["", "## Verdict (issue 42)", "",
              "- " + loses_sentence(records, "val_ppl_equal_tokens", "equal training tokens"),
              "- " + loses_sentence(records, "val_ppl_equal_time", "equal training time"),
              *verdict_lines(records), "", f"![validation perplexity]({NAME}_val_ppl.png)"]
    return "\n".join(lines) + "\n"


def write_plot(records: dict[str, dict[str, Any]], out_dir: Path) -> Path:
    """Validation perplexity (curve prefix) vs training tokens (confirm runs) and vs training seconds (equal
    time); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, r in records.items():
        left.plot([p["tokens"] for p in r["curve"]], [p["ppl"] for p in r["curve"]], marker="o", markersize=3)
        right.plot([p["seconds"] for p in r["equal_time_curve"] or r["curve"]],
                   [p["ppl"] for p in r["equal_time_curve"] or r["curve"]], marker="o", markersize=3, label=m)
    left.set_yscale("log")
    right.set_yscale("log")
    left.set_xlabel("training tokens (equal tokens: confirm runs)")
    left.set_ylabel("validation perplexity")
    left.set_title("Equal tokens", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    return compare._save(fig, right, out_dir / f"{NAME}_val_ppl.png", "training seconds (equal time)",
                         "validation perplexity", "Equal time")


def report(study: Study) -> str:
    """Write datarich.md, datarich.json and (with matplotlib) the plot from the runs file; returns the Markdown."""
    out_dir = Path(study.opts.out_dir)
    records = {m: model_summary(study, m) for m in MODEL_NAMES}
    text = markdown(study, records)
    compare._write_text(out_dir / f"{NAME}.md", text)
    compare._write_text(out_dir / f"{NAME}.json", json.dumps(_clean(list(records.values())), indent=1) + "\n")
    try:
        write_plot(records, out_dir)
    except ImportError:
        study.log('plot skipped: matplotlib is not installed (pip install -e ".[bench]")')
    return text


# ---------------------------------------------------------------------------------------------------- smoke
_FAKE_MODULE = '''"""Module {i}: a small fake standard-library file for the smoke run."""

import os


def function_{i}(value, scale={i}):
    """Return value times scale, plus the length of the current directory's name."""
    result = value * scale + len(os.getcwd())
    for step in range({n}):
        result = result - step if result > step else result + step
    return result


class Thing{i}:
    def __init__(self, name="thing{i}"):
        self.name = name

    def describe(self):
        return f"{{self.name}} is thing number {i}"
'''


def make_fake_stdlib(root: Path, per_split: int = 3, train_files: int = 24) -> Path:
    """A tree of generated .py files with `per_split` in each of validation and test (by the stdlib source's own
    split of file names) and `train_files` in train."""
    from revdeq_cli.data.builtin import hash_split

    want = {"train": train_files, "validation": per_split, "test": per_split}
    root.mkdir(parents=True, exist_ok=True)
    i = 0
    while any(want.values()):
        name = f"module_{i}.py"
        split = hash_split(name)
        if want[split]:
            (root / name).write_text(_FAKE_MODULE.format(i=i, n=3 + i % 7))
            want[split] -= 1
        i += 1
    return root


SMOKE = {"dataset": "stdlib", "hidden_size": 32, "heads": 2, "seq_len": 32, "batch_size": 4, "lrs": [2e-3, 8e-3],
         "screen_steps": 3, "steps": 5, "seeds": [0, 1], "top": 2, "eval_points": 2, "eval_batches": 1,
         "in_process": ["screen", "equal-time"], "grid_extensions": 0}  # confirm runs: fresh processes, as in the study


def set_up_smoke(opts: argparse.Namespace) -> None:
    """The smoke's sizes, and its fake standard library and token cache under --out-dir."""
    vars(opts).update(SMOKE)
    out = Path(opts.out_dir).resolve()
    if out == compare.RESULTS_DIR.resolve() or compare.RESULTS_DIR.resolve() in out.parents:
        raise SystemExit("--smoke writes into --out-dir, never into benchmarks/results: give another --out-dir")
    os.environ["REVDEQ_STDLIB_DIR"] = str(make_fake_stdlib(out / "fake-stdlib"))
    os.environ["REVDEQ_CACHE_DIR"] = str(out / "cache")


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", default="all", choices=["all", *STAGES, "report"])
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
                   help="models to run (the report always lists all six)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3], help="the screen's grid")
    p.add_argument("--grid-extensions", type=int, default=4,
                   help="a best lr at the grid's end is screened a factor 2 further out, at most this many times")
    p.add_argument("--screen-steps", type=int, default=1200)
    p.add_argument("--steps", type=int, default=3000, help="confirm: optimiser steps (equal tokens)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first for every model, all for --top")
    p.add_argument("--top", type=int, default=3, help="models (by the first seed's perplexity) run at every seed")
    p.add_argument("--dataset", default="stdlib")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "paper"])
    p.add_argument("--hidden-size", type=int, default=None, help="override the preset's width (MLP 4x)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=float, default=0.05, help="linear warmup, a fraction of each run")
    p.add_argument("--eval-points", type=int, default=12, help="validation-curve points per run")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches of the curve and the sweep")
    p.add_argument("--inference-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (--smoke: a new temporary folder)")
    p.add_argument("--in-process", nargs="*", choices=STAGES, default=None,
                   help="run these stages' runs (none named: every stage's) in this process, not each in a fresh "
                        "one: quicker, but CPU peak memory is then not measured")
    p.add_argument("--smoke", action="store_true", help="the whole protocol on a fake corpus, tiny, < 1 minute")
    opts = p.parse_args(argv)
    opts.command = "python benchmarks/datarich.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    opts.in_process = [] if opts.in_process is None else opts.in_process or list(STAGES)
    if opts.out_dir is None:
        opts.out_dir = tempfile.mkdtemp(prefix="datarich-smoke-") if opts.smoke else str(compare.RESULTS_DIR)
    if opts.smoke:
        set_up_smoke(opts)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    Path(opts.out_dir).mkdir(parents=True, exist_ok=True)
    study = Study(opts)
    started = time.perf_counter()
    if opts.action != "report":
        import torch

        torch.set_num_threads(opts.threads)
        compare._prepare_corpus(run_args(opts, 0.0, 0, 1, None))  # the token cache, before any timing
        stages = {"screen": stage_screen, "confirm": stage_confirm, "equal-time": stage_equal_time}
        for name in STAGES if opts.action == "all" else [opts.action]:
            stages[name](study)
    print(report(study))
    print(f"wrote {Path(opts.out_dir) / (NAME + '.md')}, {NAME}.json ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
