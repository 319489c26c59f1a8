"""Screen (issue 20): warm-start each training block from the state its previous visit ended at.

    python benchmarks/warm_start_screen.py --p 0.5 --seed 0      # one run; prints its record as JSON
    python benchmarks/warm_start_screen.py --p 0.5 --seed 0 --append   # ... and appends it to the runs file
    python benchmarks/warm_start_screen.py --p 0.5 --base-model recipe-tail-0.1-penalty-0.3   # on another recipe
    python benchmarks/warm_start_screen.py --p 0.5 --base-model recipe-tail-0.1-penalty-0.3-ramp-0.2  # ... ramped

The default recipe (input skip, PLN(6):24 graph-free steps + 2 differentiated, penalty 0.1) trains about 6
epochs over pydoc's 3,146 blocks. Here the trainer keeps a bank of each block's final state z_N [T, H] (float32,
206 MiB at the tiny width) and, in a batch drawn to warm-start (probability p, a generator seeded by
(seed, step)), starts the solve at the bank's states instead of z0 = x (a block not yet visited starts at x).
The graph-free and differentiated steps are the recipe's, so a batch costs what the default's does, but over
the epochs the states it trains on come from ~(epoch x 8) steps of iteration: deep states, as PLN(12) draws
them, at PLN(6)'s cost. The start is a constant, so the gradient of the differentiated steps stays exact.

A screen, not a setting: the bank is patched into the trainer here (not checkpointed: a resumed run would not
be bit-identical; one process only). If it wins it becomes a setting with the bank in the training state.
Evaluation is equilibrium.py's (`run_one`): inference starts at z0 as always.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import equilibrium  # noqa: E402

BASE_MODEL = "input-detach-pln-6-penalty-0.1"  # the default recipe
RUNS_FILE = equilibrium.RESULTS_DIR / "warm_start-runs.jsonl"
WARM_BLOCKS = [0]  # blocks that started from the bank, over the run


def patch(p: float) -> None:
    """Give the trainer a state bank and the model a start from it (training mode only)."""
    import numpy as np
    import torch

    from revdeq_cli.model.modeling import RevDEQForCausalLM
    from revdeq_cli.training import loop

    train_step = loop.Trainer._train_step

    def _train_step(self, indices):  # noqa: ANN001, ANN202
        assert self.settings.train.grad_accum == 1
        if not hasattr(self, "_bank"):
            hidden = self.model.config.hidden_size
            self._bank = torch.zeros(len(self.blocks), self.blocks.shape[1] - 1, hidden)
            self._seen = torch.zeros(len(self.blocks), dtype=torch.bool)
        idx = torch.as_tensor(np.asarray(indices[0]), dtype=torch.long)
        warm = np.random.default_rng([self.settings.train.seed, self.step, 20]).random() < p
        self.model._warm = (self._bank, self._seen, idx, warm)
        if warm:
            WARM_BLOCKS[0] += int(self._seen[idx].sum())
        try:
            return train_step(self, indices)
        finally:
            self.model._warm = None

    solve_full = RevDEQForCausalLM._solve_full
    z0_of = RevDEQForCausalLM._z0

    def _z0(self, x):  # noqa: ANN001, ANN202
        start = z0_of(self, x)
        state = getattr(self, "_warm", None)
        if not self.training or state is None or not state[3]:
            return start
        bank, seen, idx, _ = state
        keep = seen[idx].view(-1, 1, 1).to(x.device)
        return torch.where(keep, bank[idx].to(x.device, x.dtype), start)

    def _solve_full(self, x, mask, solver_steps=None, detached_steps=None, real=None):  # noqa: ANN001, ANN202
        z, stats = solve_full(self, x, mask, solver_steps, detached_steps, real)
        state = getattr(self, "_warm", None)
        if self.training and state is not None:
            bank, seen, idx, _ = state
            bank[idx] = z.detach().float().cpu()
            seen[idx] = True
        return z, stats

    loop.Trainer._train_step = _train_step
    RevDEQForCausalLM._z0 = _z0
    RevDEQForCausalLM._solve_full = _solve_full


def main() -> int:
    ap = equilibrium.screen_arguments(__doc__.split("\n\n")[0], BASE_MODEL,
                                      "the equilibrium.py model whose recipe the warm start goes on (default: the "
                                      "default's)")
    ap.add_argument("--p", type=float, required=True, help="probability that a batch warm-starts")
    args = ap.parse_args()
    patch(args.p)
    name = f"recipe-warm-start-{args.p:g}"
    if args.base_model != BASE_MODEL:
        name += "-on-" + args.base_model.removeprefix("recipe-")
    return equilibrium.screen_run(args, RUNS_FILE, name,
                                  lambda: {"warm_start_p": args.p, "warm_started_blocks": WARM_BLOCKS[0]})


if __name__ == "__main__":
    raise SystemExit(main())
