"""The training objective: the loss a training step minimises, composed from what the model returns.

    objective = TrainingObjective(settings.objective, model.config, seed=settings.train.seed)
    terms = objective(model, input_ids, targets, step=step, total_steps=total)   # training mode
    terms.loss.backward()

For a DEQ, one micro-batch's loss is (docs/equilibrium-study.md, sections named after each term)

    CE(z_N)                                            the cross-entropy read at the solver's output
    + mu * CE(f(z_N))                                  `next_iterate_loss` mu: the readout trained one step past it
    + s * lam * mean_{worst q} ||f(z_N) - z_N||^2 / ||f(z_N)||^2
                                                       `fixed_point_penalty` lam over the fraction `penalty_tail` q
                                                       of the batch's positions with the largest ratio (a CVaR),
                                                       ramped in by s = min(1, step / (`penalty_ramp` * steps))

where z_N is the end of a solve of `detached_steps` graph-free steps (drawn per optimiser step from the rule
`objective.detached_steps`, `model/step_rule.py`, by (seed, step), so every rank and a resumed run draw the same)
followed by `config.max_steps` differentiated ones. The model's gradient method differentiates those: the
reversible one exactly, for the differentiated steps from the state the graph-free ones reached. One evaluation of
f at z_N (the model's `output_next_state`) serves both extra terms. The explicit model's objective is CE alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from revdeq_cli.model.step_rule import StepRule, draw_depth, mean_depth


@dataclass
class ObjectiveTerms:
    """One micro-batch's objective: `loss` (scalar, float32, with its graph: what backward runs on),
    `cross_entropy` (CE at z_N alone, what a run reports), `penalty` (the fixed-point penalty as added, ramp
    included; None when off) and the model's `output` (its solver statistics)."""

    loss: Tensor
    cross_entropy: Tensor
    penalty: Tensor | None
    output: Any


class TrainingObjective:
    """The loss of one training micro-batch from the run's `ObjectiveSettings` (`revdeq_cli.settings`) and the
    model's config (its `max_steps`: the differentiated steps; `is_deq`)."""

    def __init__(self, settings: Any, config: Any, *, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self.is_deq = bool(config.is_deq)
        self.rules = None
        if self.is_deq:
            detached = StepRule.parse(settings.detached_steps, field="objective.detached_steps", minimum=0)
            self.rules = (StepRule.parse(config.max_steps, field="solver.max_steps", minimum=1), detached)
        self.needs_next_state = self.is_deq and bool(settings.fixed_point_penalty or settings.next_iterate_loss)

    @property
    def training_depth(self) -> int | None:
        """The solver steps a training batch takes on average, rounded up (differentiated + the graph-free
        start's mean; a curriculum's at its end): the inference depth a run stores in the model it saves. None for
        the explicit model."""
        return None if self.rules is None else mean_depth(*self.rules)

    def depth(self, step: int, total_steps: int | None, progress: float | None = None) -> dict[str, int]:
        """The forward's `solver_steps` / `detached_steps` for optimiser step `step` (0-based) of `total_steps`
        (`progress` in [0, 1]: a place in the run on the caller's own clock, e.g. a time budget); {} for the
        explicit model."""
        return draw_depth(self.rules, self.seed, step, total_steps, progress=progress)

    def penalty_scale(self, step: int, total_steps: int | None, progress: float | None = None) -> float:
        """The ramp's factor on the penalty at optimiser step `step` (0-based) of `total_steps` (None: no ramp):
        min(1, step / (penalty_ramp * total_steps)), 1 when `penalty_ramp` is 0; with `progress` given,
        min(1, progress / penalty_ramp). Like the learning-rate schedule it follows the planned steps."""
        ramp = self.settings.penalty_ramp
        if progress is not None:
            return 1.0 if ramp <= 0 else min(1.0, max(float(progress), 0.0) / ramp)
        span = ramp * total_steps if total_steps else 0.0
        return 1.0 if span <= 0 else min(1.0, step / span)

    def __call__(self, model: Any, input_ids: Tensor, targets: Tensor, *, step: int, total_steps: int | None,
                 progress: float | None = None) -> ObjectiveTerms:
        """The objective of `model` (training mode) on `input_ids` [B, T] predicting `targets` [B, T] (-100:
        ignored) at optimiser step `step`."""
        out = model(input_ids=input_ids, shift_labels=targets, output_next_state=self.needs_next_state,
                    **self.depth(step, total_steps, progress))
        cross_entropy = loss = out.loss
        penalty = None
        if out.next_state is not None:
            s = self.settings
            if s.fixed_point_penalty:  # (built before the next-iterate term: the order autograd sums in)
                penalty = s.fixed_point_penalty * fixed_point_penalty(out.state, out.next_state, s.penalty_tail)
            if s.next_iterate_loss:
                read_out = _unwrapped(model).read_out
                loss = loss + s.next_iterate_loss * next_iterate_cross_entropy(read_out, out.next_state, targets)
            if penalty is not None:
                scale = self.penalty_scale(step, total_steps, progress)
                if scale != 1.0:
                    penalty = penalty * scale
                loss = loss + penalty
        return ObjectiveTerms(loss=loss, cross_entropy=cross_entropy, penalty=penalty, output=out)


def fixed_point_penalty(z: Tensor, fz: Tensor, tail: float = 1.0) -> Tensor:
    """Mean over positions of ||f(z) - z||^2 / ||f(z)||^2 (scalar, float32) for z, fz = f(z) [B, T, H], both with
    their graphs (so the gradient also flows back through the solve); with `tail` q < 1 the mean over only the
    ceil(q * B * T) positions with the largest ratio (the top-k picks positions without a gradient, the ratios
    keep theirs)."""
    diff = (fz - z).float().pow(2).sum(-1)
    ratios = (diff / fz.float().pow(2).sum(-1).clamp(min=1e-10)).flatten()
    if tail < 1.0:
        ratios = ratios.topk(max(1, math.ceil(tail * ratios.numel())), sorted=False).values
    return ratios.mean()


def next_iterate_cross_entropy(read_out: Any, next_state: Tensor, targets: Tensor) -> Tensor:
    """The cross-entropy (float32) of the logits `read_out(f(z_N))` (the model's `read_out`; f(z_N) [B, T, H])
    against `targets` [B, T] (-100: ignored)."""
    logits = read_out(next_state)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           ignore_index=-100)


def _unwrapped(model: Any) -> Any:
    """The model itself under DistributedDataParallel (whose forward the objective calls; the head is read
    outside it, and its gradients are all-reduced with the rest)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
