"""Evaluation of a trained model: perplexity, bits per byte, solver steps, and convergence probes.

    result = evaluate_split(model, corpus.splits["test"], split_bytes=corpus.split_bytes["test"],
                            seq_len=128, batch_size=8)
    rows = solver_steps_sweep(model, tokens, [1, 2, 4, 8], split_bytes=..., seq_len=128, batch_size=8)
    trace = probe_residuals(model, input_ids)        # residual after each solver step
    per_position = probe_position_residuals(model, input_ids, 32)   # each position's residual after 32

What is exact and what is not:

* `loss` is the mean next-token cross-entropy (nats) over every target of the split exactly once
  (`data.eval_batches`: windows of `seq_len`, the tail included, padding never scored); perplexity = exp(loss).
* bits per byte = total NLL / (ln 2 * UTF-8 bytes of the split's documents). It is comparable across
  tokenizers because it divides by the text, not by the token count. Two small approximations: the first
  token of the split is never predicted, and the end-of-document tokens are predicted (their NLL counted)
  though the separators are not counted as bytes.
* Windows do not overlap, so a token early in a window sees less context than in training's average; this
  is the standard non-overlapping evaluation, the same one the trainer's validation uses.
* A window shorter than `seq_len` (the split's tail) runs as its own forward call, cut to its length, so the
  reported `max_residual` covers real positions only; the scores are those of the padded window.
* In eval mode a DEQ runs `config.inference_max_steps` solver steps; with `inference_tol` each position stops
  at its own tolerance (adaptive depth). `solver_steps` and `tol` override them per call, which is how a
  sweep measures test-time compute. `mean_solver_steps` is then a mean over the scored tokens of the steps
  each one's position iterated (`max_solver_steps` the most any took).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from revdeq_cli.training.metrics import peak_memory_bytes, perplexity, reset_peak_memory


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of one split. Losses in nats per token; `solver_steps` = the steps limit used."""

    split: str
    solver_steps: int | None  # inference steps limit in force (None: explicit model)
    tol: float | None  # the adaptive-depth tolerance in force (None: every position ran `solver_steps`)
    tokens: int  # targets scored
    bytes: int  # UTF-8 bytes of the split's text
    nll: float  # total negative log-likelihood, nats
    loss: float  # nll / tokens
    perplexity: float
    bits_per_byte: float
    mean_solver_steps: float  # steps each scored token's position took, averaged over those tokens
    max_solver_steps: int  # the most steps any scored token's position took (explicit model: its layers)
    max_residual: float  # largest final relative residual over all batches (nan: explicit model)
    seconds: float
    tokens_per_sec: float
    peak_memory_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


KEEP = object()  # `inference_steps(model, steps, tol=KEEP)`: leave the model's tolerance as it is


@contextmanager
def inference_steps(model: Any, steps: int | None, tol: Any = None) -> Any:
    """Temporarily set `model.config.inference_max_steps` (None: leave it) and `inference_tol` (adaptive
    depth; None: every position runs exactly `steps`; KEEP: the model's own, or with no `steps` given
    the model's own unless a tol is given), restoring both afterwards."""
    config = model.config
    saved = (config.inference_max_steps, config.inference_tol)
    if steps is not None:
        config.inference_max_steps = int(steps)
    if tol is not KEEP and (steps is not None or tol is not None):
        config.inference_tol = None if tol is None else float(tol)
    try:
        yield
    finally:
        config.inference_max_steps, config.inference_tol = saved


@torch.no_grad()
def evaluate_split(
    model: Any,
    tokens: np.ndarray,
    *,
    split_bytes: int,
    seq_len: int,
    batch_size: int,
    split: str = "validation",
    solver_steps: int | None = None,
    tol: Any = KEEP,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> EvalResult:
    """Score `tokens` (1-D ids) with `model` in eval mode; `solver_steps` overrides the inference steps and
    `tol` the adaptive-depth tolerance (None: fixed steps; default: a given `solver_steps` runs fixed, else
    the model's own settings).

    `split_bytes` is the UTF-8 size of the text behind `tokens` (`PreparedCorpus.split_bytes[split]`).
    `max_batches` evaluates a prefix only (then `bits_per_byte` scales bytes by the fraction of targets
    scored, an estimate). `on_batch(n_targets)` is called after each batch (progress display).
    `shard=(rank, world_size)` scores only every world_size-th batch starting at rank (the caller sums
    `nll` and `tokens` over ranks); `autocast()` is entered around each forward (mixed precision)."""
    from revdeq_cli.data import eval_batches, num_eval_batches

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    reset_peak_memory(device)
    nll = 0.0
    n_tokens = 0
    step_tokens = 0
    max_steps = 0
    max_residual = -math.inf
    t0 = time.perf_counter()
    if tol is KEEP:
        tol = None if solver_steps is not None else KEEP
    with inference_steps(model, solver_steps, tol):
        rank, world_size = shard
        for i, (inputs, targets) in enumerate(eval_batches(tokens, seq_len, batch_size, max_batches=max_batches)):
            if i % world_size != rank:
                continue
            for part_inputs, part_targets in _without_padding(inputs, targets):
                part_inputs, part_targets = part_inputs.to(device), part_targets.to(device)
                with autocast():
                    out = model(input_ids=part_inputs, shift_labels=part_targets)
                scored = part_targets != -100
                n = int(scored.sum())
                nll += float(out.loss.double()) * n
                n_tokens += n
                if out.solver_position_steps is not None:
                    taken = out.solver_position_steps[scored]
                    step_tokens += int(taken.sum())
                    max_steps = max(max_steps, int(taken.max()) if n else 0)
                elif out.solver_steps is not None:  # the explicit model: its layers
                    step_tokens += out.solver_steps * n
                    max_steps = max(max_steps, out.solver_steps)
                if out.solver_residual is not None and not math.isnan(out.solver_residual):
                    max_residual = max(max_residual, float(out.solver_residual))
                if on_batch is not None:
                    on_batch(n)
        is_deq = getattr(model.config, "is_deq", True)
        limit = model.config.eval_max_steps if is_deq else None
        used_tol = model.config.inference_tol if is_deq else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if n_tokens == 0 and world_size == 1:  # a rank of several may legitimately get no batch
        raise ValueError(f"{split} split has no targets to evaluate (fewer than 2 tokens)")
    covered = n_tokens / max(len(tokens) - 1, 1)
    if max_batches is None or num_eval_batches(tokens, seq_len, batch_size) <= max_batches:
        covered = 1.0
    loss = nll / max(n_tokens, 1)
    return EvalResult(
        split=split, solver_steps=limit, tol=used_tol, tokens=n_tokens, bytes=int(split_bytes), nll=nll, loss=loss,
        perplexity=perplexity(loss), bits_per_byte=nll / (math.log(2) * max(split_bytes * covered, 1.0)),
        mean_solver_steps=step_tokens / max(n_tokens, 1), max_solver_steps=max_steps,
        max_residual=max_residual if max_residual > -math.inf else math.nan, seconds=seconds,
        tokens_per_sec=n_tokens / seconds if seconds > 0 else math.inf, peak_memory_bytes=peak_memory_bytes(device),
    )


def _without_padding(inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch as forward calls without padding: the full windows together, a shorter (tail) window alone,
    cut to its own length. The scores are the same (padding sits after the real tokens, which causal attention
    never lets them see), but the solver's residual, a norm over the whole sequence, then covers real positions
    only: padding positions (a token the model never trained on, repeated) need not converge and would decide
    the largest residual."""
    widths = (targets != -100).sum(1)
    full = widths == targets.shape[1]
    if bool(full.all()):
        return [(inputs, targets)]
    parts = [(inputs[full], targets[full])] if bool(full.any()) else []
    for row in torch.nonzero(~full).flatten().tolist():
        width = max(int(widths[row]), 1)
        parts.append((inputs[row : row + 1, :width], targets[row : row + 1, :width]))
    return parts


def solver_steps_sweep(model: Any, tokens: np.ndarray, steps: Iterable[int | None],
                       tols: Iterable[Any] = (KEEP,), **kwargs: Any) -> list[EvalResult]:
    """`evaluate_split` once per (inference solver-steps value, tolerance) pair, steps outer (test-time compute:
    a DEQ can iterate longer than it trained; adaptive depth stops each position at a tolerance). The model's
    own settings are restored afterwards."""
    tols = list(tols)
    return [evaluate_split(model, tokens, solver_steps=s, tol=t, **kwargs) for s in steps for t in tols]


@torch.no_grad()
def probe_residuals(model: Any, input_ids: torch.Tensor, steps: int | None = None) -> list[float]:
    """The relative residual max_b ||z - f(z)|| / (1e-5 + ||f(z)||) after 1, 2, ..., `steps` solver steps
    (default: the model's inference steps) on one batch, without early stopping; z is the state eval mode reads
    (z_N, or the reversible pair's midpoint with `inference_readout: midpoint`).

    Each entry is the final residual of a fresh solve run for exactly k steps. The iteration from z0 = 0
    does not depend on the step limit, so entry k is exactly what step k of one long solve reaches."""
    if not getattr(model.config, "is_deq", True):
        raise ValueError("the explicit (stacked) model has no solver to probe")
    was_training = model.training
    model.eval()
    total = int(steps if steps is not None else model.config.eval_max_steps)
    residuals = []
    try:
        for k in range(1, total + 1):
            with inference_steps(model, k):
                out = model(input_ids=input_ids)
            residuals.append(float(out.solver_residual))
    finally:
        model.train(was_training)
    return residuals


UNSETTLED = 2e-2  # a position's relative residual above which it counts as not settled (issue 20's target at 32)


@dataclass(frozen=True)
class PositionResiduals:
    """Each position's relative residual ||z_t - f(z)_t|| / (1e-5 + ||f(z)_t||) after `steps` solver steps on
    one sequence, in order, with the figures `revdeq inspect --probe` prints. A window's residual
    (`probe_residuals`, `revdeq eval`) is the same ratio over all its positions, so a few positions that do
    not settle decide it while the rest have converged; this shows which."""

    steps: int
    residuals: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.residuals))

    @property
    def unsettled(self) -> int:
        """How many positions are above `UNSETTLED`."""
        return sum(r > UNSETTLED for r in self.residuals)

    def least_settled(self, n: int = 5) -> list[int]:
        """The positions of the `n` largest residuals, largest first."""
        return sorted(range(len(self.residuals)), key=lambda i: -self.residuals[i])[:n]


def probe_position_residuals(model: Any, input_ids: torch.Tensor, steps: int | None = None) -> PositionResiduals:
    """`PositionResiduals` of one sequence (`input_ids` [1, T]) after `steps` solver steps (default: the model's
    inference steps); ValueError for a model without a solver (`probe_equilibrium`)."""
    probe = model.probe_equilibrium(input_ids, solver_steps=steps)
    total = int(steps if steps is not None else model.config.eval_max_steps)
    return PositionResiduals(total, [float(r) for r in probe.residual[0].tolist()])


@torch.no_grad()
def probe_stopping_steps(model: Any, input_ids: torch.Tensor, tol: float, steps: int | None = None) -> list[int]:
    """Adaptive depth on one sequence (`input_ids` [1, T]): the solver steps each position takes before its
    relative residual falls below `tol` (at most `steps`, default the model's inference steps), in order."""
    if not getattr(model.config, "is_deq", True):
        raise ValueError("the explicit (stacked) model has no solver to probe")
    was_training = model.training
    model.eval()
    try:
        with inference_steps(model, steps if steps is not None else model.config.eval_max_steps, tol):
            out = model(input_ids=input_ids)
    finally:
        model.train(was_training)
    return [int(k) for k in out.solver_position_steps[0].tolist()]
