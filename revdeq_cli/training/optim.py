"""AdamW with decoupled weight decay and the learning-rate schedules of `train.schedule`.

Weight decay applies to matrices only (linear and embedding weights, dim >= 2); biases and LayerNorm gains
are not decayed (as in nanoGPT). The schedule is a small stateful object rather than a
`torch.optim.lr_scheduler`, because reduce-on-plateau must compose with warmup and its state must round-trip
through `training_state.pt`:

    cosine    linear warmup over `warmup_steps`, then cosine decay to lr * min_lr_ratio at `total_steps`
    constant  linear warmup, then lr
    plateau   linear warmup, then lr * factor**k, where k counts validation evaluations that failed to improve
              the best loss `patience` times in a row (the earlier reference code's ReduceLROnPlateau)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; decay on dim>=2 tensors only. `foreach` keeps it fast on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class LRSchedule:
    """Sets `lr` on every param group of `optimizer`; call `step()` once per optimiser step and
    `observe(val_loss)` after each validation (used by "plateau" only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, lr: float, warmup_steps: int,
                 total_steps: int, min_lr_ratio: float = 0.1, plateau_factor: float = 0.5,
                 plateau_patience: int = 2) -> None:
        if kind not in ("cosine", "constant", "plateau"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.optimizer = optimizer
        self.kind, self.base_lr, self.warmup_steps, self.total_steps = kind, lr, warmup_steps, total_steps
        self.min_lr_ratio, self.plateau_factor, self.plateau_patience = min_lr_ratio, plateau_factor, plateau_patience
        self.step_count = 0
        self.plateau_scale = 1.0
        self.best_loss = math.inf
        self.bad_evals = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate for optimiser step `step` (0-based: the step about to be taken)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            ratio = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return self.base_lr * ratio
        if self.kind == "plateau":
            return self.base_lr * self.plateau_scale
        return self.base_lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def observe(self, val_loss: float) -> None:
        """Record a validation loss; after `patience` evaluations without improvement, cut the lr."""
        if val_loss < self.best_loss:
            self.best_loss, self.bad_evals = val_loss, 0
            return
        self.bad_evals += 1
        if self.kind == "plateau" and self.bad_evals > self.plateau_patience:
            self.plateau_scale *= self.plateau_factor
            self.bad_evals = 0
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "best_loss": self.best_loss, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best_loss = float(state["best_loss"])
        self.bad_evals = int(state["bad_evals"])
        self._apply()
