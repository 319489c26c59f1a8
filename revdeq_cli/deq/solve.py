"""`solve`: find `z* = f(z*, x)` with a solver, differentiate it with a gradient method."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from revdeq_cli.deq.adjoints import (
    KEEP_BEST_REVERSIBLE,
    BackwardStats,
    GradientMethod,
    ImplicitAdjoint,
    ReversibleAdjoint,
    UnrolledAdjoint,
    iterate,
)
from revdeq_cli.deq.iteration import Iteration
from revdeq_cli.deq.problem import AutocastState, Problem
from revdeq_cli.deq.solvers import IterateState, Reversible, Solver, with_state_dtype
from revdeq_cli.deq.state import State, StateSpec, tree_leaves
from revdeq_cli.solver_facts import SOLVER_FACTS

Adjoint = GradientMethod  # UnrolledAdjoint, ReversibleAdjoint, ImplicitAdjoint or PhantomAdjoint
_DEFAULT_ADJOINTS = {"reversible": ReversibleAdjoint, "unrolled": UnrolledAdjoint, "implicit": ImplicitAdjoint}


def default_adjoint(solver: Solver) -> Adjoint:
    """The gradient method `solve` uses when none is given: the solver's `default_adjoint` in
    revdeq_cli.solver_facts (Reversible -> ReversibleAdjoint, Picard/Relaxed -> UnrolledAdjoint,
    Anderson/Broyden and solvers not in the table -> ImplicitAdjoint)."""
    facts = SOLVER_FACTS.get(type(solver).__name__.lower())
    return _DEFAULT_ADJOINTS[facts.default_adjoint if facts is not None else "implicit"]()


@dataclass
class Solution:
    """The result of `solve`.

    z:        the returned state, same structure, shapes and dtypes as z0: the solver's last iterate z_N
              (with keep_best: each sample's lowest-residual iterate), carrying the gradient method's
              graph. Every gradient method returns this point's value (ImplicitAdjoint and PhantomAdjoint
              attach their extra evaluations' graph to it without changing it).
    steps:    solver steps taken (<= max_steps; fewer when the residual fell below tol).
    group_steps: with `groups`, [B, G] long: the steps each group iterated before it froze (0: frozen from
              the start by `active`); None otherwise (every group took `steps`).
    residual: [B] float64, the per-sample relative residual ||z - f(z)|| / (1e-5 + ||f(z)||) of the
              returned z (exactly, up to the cast back to the compute dtype, which is lossless when the
              state dtype is no wider).
    nfe:      forward evaluations of f (Reversible: 1 + 2 * steps; others 1 + steps, plus the extra
              evaluations Implicit (1) and Phantom (k) attach to the graph when autograd is on).
    trace:    the largest per-sample residual after each step (len == steps); with `trace=False`,
              tol=None and no keep_best, after the last step only (len == 1).
    backward: statistics of the backward pass, filled in when it runs (see `BackwardStats`).
    y:        Reversible only: the other iterate of its pair, y_N (same structure, shapes and dtypes as z),
              for a readout of the pair such as its midpoint (y_N + z_N) / 2 (`docs/DESIGN.md` §1: the pair is
              at rest on a 2-cycle of f as well as at a fixed point). It carries a graph under UnrolledAdjoint
              only (Implicit and Phantom attach theirs to z alone); None under ReversibleAdjoint with autograd
              on (its backward starts from z_N's cotangent alone) and for the other solvers.
    """

    z: State
    steps: int
    residual: Tensor
    nfe: int
    trace: list[float]
    backward: BackwardStats
    group_steps: Tensor | None = None
    y: State | None = None

    @property
    def max_residual(self) -> float:
        return float(self.residual.max())


def solve(
    f: Callable[[State, Any], State],
    z0: State,
    x: Any = None,
    *,
    solver: Solver,
    adjoint: Adjoint | None = None,
    tol: float | None = 1e-3,
    max_steps: int = 8,
    params: Iterable[Tensor] | None = None,
    trace: bool = True,
    keep_best: bool = False,
    detached_steps: int = 0,
    detached_dtype: torch.dtype | None = None,
    groups: int | None = None,
    active: Tensor | None = None,
) -> Solution:
    """Solve `z = f(z, x)` from `z0` and return a `Solution` whose `z` carries the gradient `adjoint` defines.

    f:         `f(z, x) -> state` of the same structure as z. An `nn.Module` (its parameters get gradients)
               or any callable; a callable that uses tensors requiring grad must list them in `params`.
    z0:        a Tensor or tuple of Tensors, batch in dim 0 (often zeros). Its dtypes are f's compute
               dtypes; the solver's `state_dtype` (Reversible: float64) holds the iterates.
    x:         the input injection, passed to f unchanged: a Tensor, a (nested) tuple/list/dict of Tensors
               or None. Its tensor leaves receive gradients.
    solver:    Picard, Relaxed, Anderson, Broyden or Reversible.
    adjoint:   UnrolledAdjoint, ReversibleAdjoint (Reversible only), ImplicitAdjoint or PhantomAdjoint.
               Default (`default_adjoint`, from revdeq_cli.solver_facts): ReversibleAdjoint for Reversible,
               UnrolledAdjoint for Picard and Relaxed, ImplicitAdjoint for Anderson and Broyden.
    tol:       stop once the largest per-sample relative residual is below tol; None runs exactly
               `max_steps` steps (a fixed evaluation schedule, as cached generation needs).
    max_steps: at most this many solver steps (>= 1).
    trace:     compute the residual after every step. With tol=None nothing needs it but `Solution.trace`;
               False computes it after the last step only (a non-finite residual is then reported at the
               last step), which saves a few reductions per step when solving many tiny problems, e.g.
               decoding one token at a time.
    keep_best: return each sample's lowest-residual iterate over steps 1..N instead of the last one (as
               torchdeq does), for solves that may not converge: the solver still runs on from its own
               state, and `residual` is the returned iterate's. Picard, Relaxed, Anderson and Broyden
               only (ValueError for Reversible: its gradient reverses from the last iterate). Composes with
               ImplicitAdjoint and PhantomAdjoint (they restart from the returned point) and with
               UnrolledAdjoint, which differentiates through the per-sample selection (a `torch.where`
               per step): each sample's gradient is exactly that of the iterate it returns, and the graph
               keeps one more [B, D] tensor per step.

    detached_steps: run this many steps first without a graph (their end is where the differentiated
               `max_steps` steps start; no gradient flows through them; `Solution.steps` counts both).
    detached_dtype: the dtype f computes in during the detached steps (torch.bfloat16 / float16: under
               autocast, iterates in f's own dtype instead of the solver's state dtype), None: as the rest of
               the solve. Nothing reverses those steps, so their precision only moves where the differentiated
               steps start: f at that start is evaluated again in full precision, and the differentiated steps
               and their gradient are exactly what they would be from that start (one more evaluation of f).

    groups:    per-group stopping (adaptive depth; docs/DESIGN.md §7): each sample's D state elements are
               `groups` equal parts (a sequence model: its positions) with their own relative residual; a group
               whose residual falls below `tol` (required) is frozen: every tensor of the solver state keeps
               its value for it while f still sees it. The solve ends when every group is frozen or at
               max_steps; `Solution.group_steps` says how many steps each took. Under autograd only
               UnrolledAdjoint (which differentiates through the freezing), ImplicitAdjoint and PhantomAdjoint
               (from the returned point) take it; not with keep_best or detached_steps.
    active:    with groups, [B, groups] bool: the groups that iterate (False: frozen at z0 from the start,
               e.g. padding positions, which then never hold the solve up).

    Under `torch.no_grad()` nothing is recorded. Raises ValueError for bad arguments or an f whose output
    does not match z, and `SolverDivergedError` (naming the step) when the residual becomes non-finite.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0 (or None for a fixed number of steps), got {tol!r}")
    if not isinstance(solver, Solver):
        raise ValueError(f"solver must be Picard, Relaxed, Anderson, Broyden or Reversible, got {solver!r}")
    if not isinstance(detached_steps, int) or isinstance(detached_steps, bool) or detached_steps < 0:
        raise ValueError(f"detached_steps must be an integer >= 0, got {detached_steps!r}")
    if keep_best and isinstance(solver, Reversible):
        raise ValueError(KEEP_BEST_REVERSIBLE)
    if detached_dtype is not None and detached_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"detached_dtype must be torch.bfloat16, torch.float16 or None, got {detached_dtype!r}")
    if groups is not None and (keep_best or detached_steps):
        raise ValueError("groups (per-group stopping) cannot be combined with keep_best or detached_steps")
    if groups is None and active is not None:
        raise ValueError("active needs groups (it marks which of the groups iterate)")
    if adjoint is None:
        adjoint = default_adjoint(solver)
    if isinstance(adjoint, ReversibleAdjoint) and not isinstance(solver, Reversible):
        raise ValueError(
            f"ReversibleAdjoint needs the Reversible solver, got {type(solver).__name__}: use UnrolledAdjoint, "
            "ImplicitAdjoint or PhantomAdjoint with it"
        )

    spec = StateSpec.of(z0)
    state_dtype = solver.state_dtype or _promote(spec.dtypes)
    device = (z0[0] if isinstance(z0, tuple) else z0).device
    problem = Problem(f=f, x=x, spec=spec, state_dtype=state_dtype, autocast=AutocastState.capture(device.type),
                      trace=trace)
    if params is None:
        params = f.parameters() if isinstance(f, nn.Module) else ()
    grad_params = [p for p in params if p.requires_grad]
    with problem.arithmetic():
        z0_flat = spec.flatten(z0, state_dtype)

    start, prefix_trace = None, []
    if detached_steps:
        with torch.no_grad():
            if detached_dtype is None:
                prefix = iterate(solver, problem, z0_flat, None, detached_steps)
                start = prefix.state
            else:
                prefix, start = _low_precision_prefix(solver, problem, z0_flat, detached_steps, detached_dtype)
        prefix_trace = prefix.trace
        z0_flat = start.z
        if isinstance(adjoint, UnrolledAdjoint) and torch.is_grad_enabled():
            # f(z_k) is the first differentiated evaluation (ReversibleAdjoint re-evaluates it in its backward)
            start = replace(start, fz=problem.evaluate(z0_flat))
        elif detached_dtype is not None:
            # the differentiated steps start from (y_k, z_k) in full precision: f(z_k) too, or the first step's
            # y would carry the prefix's rounding, which the reversal (in full precision) would not undo
            start = replace(start, fz=problem.evaluate(z0_flat))
    out = adjoint.run(problem, solver, z0_flat, grad_params, tol, max_steps, keep_best=keep_best, start=start,
                      groups=groups, active=active)
    it = out.iteration
    pair = getattr(it.state, "y", None) if it.state is not None else None
    with problem.arithmetic():
        z = spec.unflatten(out.z)
        y = spec.unflatten(pair) if pair is not None else None
    return Solution(z=z, steps=detached_steps + it.steps, residual=it.residual, nfe=problem.nfe,
                    trace=prefix_trace + it.trace, backward=out.backward, group_steps=it.group_steps, y=y)


def _low_precision_prefix(solver: Solver, problem: Problem, z0: Tensor, steps: int,
                          dtype: torch.dtype) -> tuple[Iteration, IterateState]:
    """`steps` graph-free steps in `dtype`: iterates, f's input x (its floating leaves) and f's compute dtypes in
    `dtype`, f under `dtype` autocast (so parameters are cast once for the whole prefix, autocast's weight cache)
    -> (the iteration, its final state with every [B, D] tensor in the solver's state dtype). Counts its
    evaluations in `problem.nfe`."""
    leaves = [leaf.to(dtype) if leaf.is_floating_point() else leaf for leaf in tree_leaves(problem.x)]
    low = replace(problem, x=problem.with_x(leaves) if leaves else problem.x, state_dtype=dtype, nfe=0,
                  spec=replace(problem.spec, dtypes=tuple(dtype for _ in problem.spec.dtypes)),
                  autocast=AutocastState(problem.autocast.device_type, True, dtype))
    with low.autocast.f_context():  # one autocast region: the weight casts are cached across evaluations
        prefix = iterate(with_state_dtype(solver, dtype), low, z0.to(dtype), None, steps)
    problem.nfe += low.nfe
    state = prefix.state
    values = {f.name: getattr(state, f.name) for f in fields(state)}
    for name, value in values.items():
        if isinstance(value, Tensor) and value.shape == z0.shape:
            values[name] = value.to(problem.state_dtype)
    return prefix, type(state)(**values)


def _promote(dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    result = dtypes[0]
    for d in dtypes[1:]:
        result = torch.promote_types(result, d)
    return result
