"""What a forward call of `RevDEQForCausalLM` returns (shapes: B batch, T positions, H width, V vocabulary), and
the language-model loss it computes from its logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class SolverStats:
    """What the equilibrium solve of one forward call did (explicit model: `steps` = `nfe` = layers)."""

    steps: int
    residual: float  # max over the batch of the final relative residual; nan for the explicit model
    nfe: int  # forward evaluations of f
    position_steps: Tensor | None = None  # [B, T] long: the steps each position iterated (0: padding, or z0 itself)
    backward: Any = None  # deq.BackwardStats, filled in when loss.backward() runs; None if not a DEQ


@dataclass
class EquilibriumProbe:
    """Where a solve left each position (`RevDEQForCausalLM.probe_equilibrium`; no graph). `x` the input
    injection, `z` the solver's output and `fz` = f(z, x), one more evaluation of the block, each [B, T, H] in the
    model dtype; `residual` [B, T] float64, each position's ||z_t - f(z)_t|| / (1e-5 + ||f(z)_t||) (`revdeq
    eval`'s residual is the same ratio over a whole window's positions); `logits` [B, T, V] read from z."""

    x: Tensor
    z: Tensor
    fz: Tensor
    residual: Tensor
    logits: Tensor


@dataclass
class RevDEQCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` (loss, logits, cache) plus the solver statistics of this call.

    transformers v5 names the cache `cache`; `past_key_values` still reads it (with a deprecation warning)."""

    solver_steps: int | None = None  # steps the solve ran (the most any position took)
    solver_position_steps: Tensor | None = None  # [B, T] long: each position's steps (adaptive depth: its own)
    solver_residual: float | None = None
    solver_nfe: int | None = None
    solver_backward: Any = None
    state: Tensor | None = None  # with output_next_state: z [B, T, H], the state the logits read (with its graph)
    next_state: Tensor | None = None  # ... and f(z) [B, T, H], one more evaluation of the block (with its graph)


def lm_loss(logits: Tensor, labels: Tensor | None, shift_labels: Tensor | None) -> Tensor | None:
    """Mean next-token cross-entropy (float32) over targets != -100; None without targets."""
    if labels is not None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    elif shift_labels is not None:
        targets = shift_labels
    else:
        return None
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape[:2])}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           ignore_index=-100)
