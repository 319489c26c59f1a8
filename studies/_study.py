"""What the study scripts (recipe.py, equilibrium.py) share: a file of runs, one JSON object a line, running the
runs not in it yet, each in a fresh child process of the script (`script child SPEC`), and the choice of models.

A run is keyed by (model, lr, steps, seed); a failed child is recorded with `failed` (its last stderr line)
and val_ppl inf, so a study can be stopped and continued and its report leaves failures out."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Job = tuple[str, float, int, int]  # model, lr, steps, seed
RETIRED = None  # a study model's overrides when its option is no longer in revdeq: its runs stay in the report


def chosen_models(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  models: dict[str, tuple[str, dict[str, Any] | None]], default: list[str]) -> list[str]:
    """`--models` (comma-separated; default `default`), refusing unknown names, and retired ones (overrides
    RETIRED) unless the action is `report`."""
    chosen = args.models.split(",") if args.models else default
    unknown = [m for m in chosen if m not in models]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(models)}")
    retired = [m for m in chosen if models[m][1] is RETIRED]
    if retired and args.action != "report":
        parser.error(f"retired models {retired}: their options are no longer in revdeq (their runs stay in the report)")
    return chosen


def load_runs(runs_file: Path) -> list[dict[str, Any]]:
    if not runs_file.exists():
        return []
    return [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]


def _key(model: str, lr: float, steps: int, seed: int) -> Job:
    return (model, float(lr), int(steps), int(seed))


def run_missing(jobs: Sequence[Job], args: argparse.Namespace, *, script: str, runs_file: Path,
                describe: Callable[[dict[str, Any]], str], keep_env: Sequence[str] = (),
                done_on: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Run every job not yet in `runs_file`, `args.jobs` at a time, each as `script child SPEC` with one
    torch thread, offline, and no REVDEQ_* variables but the token cache's and `keep_env`; append each
    record and print `describe(record)` as it lands. `done_on(record)`: whether a recorded run counts as done
    (e.g. only runs on this CPU, where one seed trains to other figures on another); None: every recorded run."""
    done = {_key(r["model"], r["lr"], r["steps"], r["seed"]) for r in load_runs(runs_file)
            if done_on is None or done_on(r)}
    todo = [j for j in jobs if _key(*j) not in done]
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} already in {runs_file.name})", flush=True)
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    kept = {"REVDEQ_CACHE_DIR", *keep_env}

    def child(job: Job) -> None:
        model, lr, steps, seed = job
        spec = json.dumps({"model": model, "lr": lr, "steps": steps, "seed": seed,
                           "curve_every": args.curve_every or max(25, steps // 12),
                           "curve_batches": args.curve_batches})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("REVDEQ_") or k in kept}
        proc = subprocess.run([sys.executable, script, "child", spec], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"FAILED {job}: {last}", flush=True)
            record = {"model": model, "lr": lr, "steps": steps, "seed": seed, "val_ppl": math.inf, "failed": last}
        else:
            record = json.loads(proc.stdout.strip().splitlines()[-1])
        with runs_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{model:22s} lr {lr:g} steps {steps} seed {seed}: {describe(record)} "
              f"({record.get('wall_seconds', 0):.0f} s)", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(child, todo))
