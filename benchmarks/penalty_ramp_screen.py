"""Screen (issue 20): ramp the fixed-point penalty's weight in over the first optimiser steps.

    python benchmarks/penalty_ramp_screen.py --ramp 240 --seed 3            # one run; prints its record as JSON
    python benchmarks/penalty_ramp_screen.py --ramp 240 --seed 3 --append   # ... and appends it to the runs file

With the penalty 0.3 over the worst 10% of positions on the default's PLN(6):24 start
(`recipe-tail-0.1-penalty-0.3`), seed 0 trains to 5.32 with res@32 0.005 but seed 3 to 6.85: its validation
perplexity is 27.6 at step 100 against the default's 22.4 and never catches up, so the penalty seems to hurt
most while the model is still far from any fixed point. Here the penalty's weight is lam * min(1, step / ramp)
(step counted from 0, so the first optimiser step has none). A screen, not a setting: the scale is patched into
the trainer and the model here (one process). The rest, evaluation included, is equilibrium.py's (`run_one`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import equilibrium  # noqa: E402

BASE_MODEL = "recipe-tail-0.1-penalty-0.3"
RUNS_FILE = equilibrium.RESULTS_DIR / "penalty_ramp-runs.jsonl"


def patch(ramp: int) -> None:
    """Scale the training penalties by min(1, step / ramp) (the trainer's step before this optimiser step)."""
    from revdeq_cli.model.modeling import RevDEQForCausalLM
    from revdeq_cli.training import loop

    train_step = loop.Trainer._train_step
    penalties = RevDEQForCausalLM._penalties

    def _train_step(self, indices):  # noqa: ANN001, ANN202
        self.model._penalty_scale = min(1.0, self.step / ramp) if ramp > 0 else 1.0
        try:
            return train_step(self, indices)
        finally:
            self.model._penalty_scale = 1.0

    def _penalties(self, z, x, mask):  # noqa: ANN001, ANN202
        return penalties(self, z, x, mask) * getattr(self, "_penalty_scale", 1.0)

    loop.Trainer._train_step = _train_step
    RevDEQForCausalLM._penalties = _penalties


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ramp", type=int, required=True, help="optimiser steps over which the weight rises to lam")
    ap.add_argument("--base-model", default=BASE_MODEL, choices=sorted(equilibrium.MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    patch(args.ramp)
    record = equilibrium.run_one(args.base_model, args.lr, args.steps, args.seed, curve_every=100, curve_batches=4)
    record.update(model=f"{args.base_model}-ramp-{args.ramp}", penalty_ramp_steps=args.ramp,
                  base_model=args.base_model)
    line = json.dumps(record)
    print(line)
    if args.append:
        with RUNS_FILE.open("a") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
