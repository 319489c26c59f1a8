"""TensorBoard scalars of a run (docs/DESIGN.md §6), written under the run's `logs/` by rank 0.

Tags: train/loss, train/ppl, val/loss, val/ppl, lr, grad_norm, tokens_per_sec, solver/steps,
solver/residual, solver/backward_nfe, solver/reconstruction_error (reversible only), mem/peak_gib; plus
test/loss, test/ppl at the end and the run's hyperparameters (flattened settings) with the best and final
validation perplexity as hparam metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from revdeq_cli.training.progress import StepStats

TRAIN_TAGS = ("train/loss", "train/ppl", "lr", "grad_norm", "tokens_per_sec", "solver/steps",
              "solver/residual", "solver/backward_nfe", "mem/peak_gib")
VAL_TAGS = ("val/loss", "val/ppl")


class TensorBoardLog:
    """Thin wrapper over `torch.utils.tensorboard.SummaryWriter` (created lazily, rank 0 only)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def train_step(self, s: StepStats) -> None:
        values = {"train/loss": s.loss, "train/ppl": s.ppl, "lr": s.lr, "grad_norm": s.grad_norm,
                  "tokens_per_sec": s.tokens_per_sec, "solver/steps": s.solver_steps,
                  "solver/residual": s.solver_residual, "solver/backward_nfe": s.backward_nfe,
                  "solver/reconstruction_error": s.reconstruction_error,
                  "mem/peak_gib": s.memory_bytes / 2**30}
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, s.step)

    def evaluation(self, split: str, step: int, loss: float, ppl: float) -> None:
        prefix = "val" if split == "validation" else split
        self.writer.add_scalar(f"{prefix}/loss", loss, step)
        self.writer.add_scalar(f"{prefix}/ppl", ppl, step)

    def hparams(self, flat_settings: dict[str, Any], metrics: dict[str, float]) -> None:
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_settings.items()}
        clean = {f"hparam/{k}": (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}
        self.writer.add_hparams(hp, clean, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
