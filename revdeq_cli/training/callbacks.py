"""Callbacks: what code outside the trainer may watch and steer in a run (benchmarks, studies, notebooks).

    class Budget(Callback):
        def on_step(self, trainer, record):          # after each optimiser step
            if time.monotonic() > self.deadline:
                trainer.request_finish()             # finish as at the planned end

    Trainer(settings, ..., callbacks=[Budget()]).run()

Every hook does nothing by default; a subclass overrides the ones it needs. A hook may call the trainer's
`request_finish()`, `set_lr(lr)` and `set_progress(fraction)` (see `Trainer`), and read its public state (`step`,
`total_steps`, `tokens_seen`, `model`, `history`, ...). Every rank of a torchrun job is given the same callbacks.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Hooks into a run, each called with the trainer first."""

    def on_start(self, trainer: Any) -> None:
        """Before this session's first optimiser step (after setup, and after a resume's restore)."""

    def on_step(self, trainer: Any, record: dict[str, float]) -> None:
        """After each optimiser step; `record` is the step's history entry (step, loss, lr, grad_norm, solver
        figures)."""

    def on_evaluation(self, trainer: Any, split: str, loss: float) -> None:
        """After each evaluation: `split` is "validation" (the whole split), "validation-prefix" (the first
        `train.eval_batches` batches) or "test"; `loss` in nats per token."""
