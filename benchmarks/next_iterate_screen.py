"""Screen (issue 20): also read the prediction at the next iterate f(z_N), so the readout learns the states past
the trained depth.

    python benchmarks/next_iterate_screen.py --mu 1 --seed 0            # one run; prints its record as JSON
    python benchmarks/next_iterate_screen.py --mu 1 --seed 0 --append   # ... and appends it to the runs file
    python benchmarks/next_iterate_screen.py --mu 1 --base-model recipe-pln-8-tail-0.1-penalty-0.3-ramp-0.2
    python benchmarks/next_iterate_screen.py --mu 1 --normalize     # (CE(z_N) + CE(f(z_N))) / 2 + the penalty

The trained model reads the state at its training depth best (the default: 5.22 at 8 steps) and the states the
iteration reaches later slightly worse (5.34 at 32): its readout was trained on depth ~8 only. The fixed-point
penalty already evaluates f once more at the solver's output, f(z_N) with its graph: one full step of the
iteration further on. Here the training loss adds mu x the cross-entropy read at that state,
CE(lm_head(ln_f(f(z_N)))), so the readout (and the block, through it) is trained on both z_N and the state after
it. It costs the output head once more (257 bytes at the tiny width: nothing next to f) and no evaluation of f:
the backward through f(z_N) is the penalty's. The gradient stays exact: the extra term is differentiated
through f(z_N) and, via z_N, through the reversible steps, like the penalty.

A screen, not a setting: the extra loss is patched into the model here. If it wins it becomes a setting.
Evaluation is equilibrium.py's (`run_one`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import equilibrium  # noqa: E402

BASE_MODEL = "recipe-tail-0.1-penalty-0.3-ramp-0.2"  # the default recipe (round 10)
RUNS_FILE = equilibrium.RESULTS_DIR / "next_iterate-runs.jsonl"


def patch(mu: float, normalize: bool = False) -> None:
    """Keep f(z_N) from the penalty's evaluation and add mu x the cross-entropy read there (training only);
    `normalize`: (CE(z_N) + mu x CE(f(z_N))) / (1 + mu) instead, so the penalties keep their weight relative to
    the cross-entropy (AdamW is blind to the loss's scale, not to the ratio of its terms)."""
    import torch.nn.functional as F

    from revdeq_cli.model.modeling import RevDEQForCausalLM

    penalties, forward = RevDEQForCausalLM._penalties, RevDEQForCausalLM.forward

    def _penalties(self, z, x, mask):  # noqa: ANN001, ANN202
        block, seen = self.blocks[0], []

        def keep(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = type(block).forward(block, *args, **kwargs)
            seen.append(out)
            return out

        block.forward = keep  # the penalty's f(z_N) is its first evaluation of the block
        try:
            total = penalties(self, z, x, mask)
        finally:
            del block.forward
        self._next_iterate = seen[0] if seen else None
        return total

    def _forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        self._next_iterate = None
        out = forward(self, *args, **kwargs)
        targets = kwargs.get("shift_labels")
        if self.training and self._next_iterate is not None and targets is not None:
            logits = self.lm_head(self.ln_f(self._next_iterate)).float()
            extra = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            if normalize:
                reg = out.regularization if out.regularization is not None else 0.0
                out.loss = (out.lm_loss + mu * extra) / (1 + mu) + reg
            else:
                out.loss = out.loss + mu * extra
        self._next_iterate = None
        return out

    RevDEQForCausalLM._penalties = _penalties
    RevDEQForCausalLM.forward = _forward


def main() -> int:
    ap = equilibrium.screen_arguments(__doc__.split("\n\n")[0], BASE_MODEL,
                                      "the equilibrium.py model whose recipe the extra loss goes on (needs its "
                                      "penalty on)")
    ap.add_argument("--mu", type=float, required=True, help="weight of the cross-entropy read at f(z_N)")
    ap.add_argument("--normalize", action="store_true",
                    help="(CE at z_N + mu x CE at f(z_N)) / (1 + mu): the penalties keep their relative weight")
    args = ap.parse_args()
    patch(args.mu, args.normalize)
    name = f"{args.base_model}-next-iterate-{args.mu:g}{'-normalized' if args.normalize else ''}"
    return equilibrium.screen_run(args, RUNS_FILE, name,
                                  lambda: {"next_iterate_mu": args.mu, "next_iterate_normalized": args.normalize})


if __name__ == "__main__":
    raise SystemExit(main())
