"""Decoding against a cache: the solve of a forward call's new positions when `RevDEQForCausalLM` is given a
`RevDEQCache` (model.py's `_body` routes there). "exact" mode keeps every evaluation's keys/values and equals a
full recomputation; "fixed_point" keeps the final states' only (cache.py, docs/DESIGN.md §7). Both run the
model's own solve (its `_solve`, `_bypass`); they live apart so that modeling.py keeps to the forward pass."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from revdeq_cli import deq
from revdeq_cli.model.block import AttentionMask
from revdeq_cli.model.cache import EvaluationKeyValues, PastKeyValues, RevDEQCache
from revdeq_cli.model.outputs import SolverStats
from revdeq_cli.solver_facts import SOLVER_FACTS


def solve_exact_cached(model: Any, x: Tensor, mask: AttentionMask, cache: RevDEQCache,
                       real: Tensor | None = None) -> tuple[Tensor, SolverStats]:
    """`inference_max_steps` steps (adaptive depth: each new position until it freezes); evaluation k reads
    and extends cache layer k. Layers a solve that ended early (every new position frozen) did not reach are
    completed by the next solve that does, with the held keys/values (`EvaluationKeyValues`): what those
    evaluations would have computed, since a frozen state does not change."""
    config = model.config
    steps, tol = config.eval_max_steps, config.inference_tol
    readout = model._reads_midpoint() and steps > 0
    cache.claim(("exact", config.solver, config.beta, steps, config.state_dtype, tol, readout))
    per_step = SOLVER_FACTS[config.solver].evaluations_per_step
    hook = EvaluationKeyValues(cache, past=cache.get_seq_length(), per_step=per_step)
    if steps == 0:  # z = z0; f's one evaluation (the residual) fills layer 0
        z, stats = model._bypass(x, mask, hook)
    else:
        # Unrolled: if gradients are wanted, autograd follows the cached evaluations as they happened.
        # the readout's evaluation has the last layer, wherever the solve stopped (adaptive depth)
        z, stats = model._solve(x, mask, hook, tol=tol, max_steps=steps, adjoint=deq.UnrolledAdjoint(),
                                per_position=tol is not None, real=real, readout=readout,
                                readout_layer=per_step * steps + 1)
    total = 1 + per_step * steps + int(readout)  # evaluations of a solve that runs every step (+ the readout's)
    if cache.num_evaluations is None:
        cache.num_evaluations = total
    elif hook.calls > total or total != cache.num_evaluations or (tol is None and hook.calls != total):
        raise RuntimeError(
            f"cache: this solve evaluated f {hook.calls} times (of {total}) but the cache holds "
            f"{cache.num_evaluations} evaluations; the cached keys/values no longer match"
        )
    return z, stats


def solve_fixed_point_cached(model: Any, x: Tensor, mask: AttentionMask, cache: RevDEQCache,
                             real: Tensor | None = None) -> tuple[Tensor, SolverStats]:
    """Solve the new positions to tolerance against the cached final-state keys/values, then cache theirs."""
    config = model.config
    tol = config.inference_tol if config.inference_tol is not None else config.tol
    readout = model._reads_midpoint()
    cache.claim(("fixed_point", config.solver, readout))
    past = cache.past_keys_values()
    hook = PastKeyValues(*past) if past is not None else None
    if config.eval_max_steps == 0:  # z = z0 (no attention needed); its keys/values are cached below
        z = model._z0(x)
        stats = SolverStats(steps=0, residual=math.nan, nfe=0,
                            position_steps=torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))
    else:
        z, stats = model._solve(x, mask, hook, tol=tol, max_steps=config.eval_max_steps,
                                adjoint=deq.UnrolledAdjoint(), per_position=True, real=real, readout=readout)
    block = model.blocks[0]
    keys, values = block.attn.keys_values(block.attention_input(z, x))
    cache.update(keys, values, 0)
    return z, stats
