"""The forward iteration of a fixed-point solve: run a solver from z0 until the residual is below tol.

    iteration = iterate(solver, problem, z0, tol, max_steps)   # -> Iteration(state, steps, trace, residual, z)
    iteration = iterate(..., groups=T)    # per-group stopping: each of T groups freezes at its own tolerance

Every gradient method (deq/adjoints.py) runs its forward pass through `iterate`, with or without a graph;
a NaN or infinite residual raises `SolverDivergedError` naming the step and the remedies that apply.

Per-group stopping (adaptive depth, docs/DESIGN.md §7). With `groups=G` each sample's flat state [D] is G
equal parts (a sequence model: its positions, D = T * H) with their own relative residual. After every
step a group whose residual is below `tol` is *frozen*: from the next step on every tensor of the solver's
state for it (z, f(z), the reversible y) keeps its value, while the others go on. f still sees the frozen
parts (f is evaluated on the whole state), so a frozen position keeps serving attention with the
keys/values of its frozen state. The iteration ends when every group is frozen or at `max_steps`.
Because a group's update and its freezing decision read only its own state and f's output for it, a
group's trajectory depends on the others only through f: under causal attention, only on earlier positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from revdeq_cli.deq.problem import Problem
from revdeq_cli.deq.solvers import IterateState, Solver
from revdeq_cli.deq.state import relative_residual


class SolverDivergedError(FloatingPointError):
    """The residual became NaN or infinite.

    step:     the solver step at which it first appeared.
    where:    "forward" (the fixed-point solve) or "backward" (ImplicitAdjoint's linear solve
              `u = J^T u + g`, run when autograd reaches the DEQ). The message names the solve and the
              remedies that apply to it.
    remedies: forward only: what to suggest (`iterate` leaves out what would change nothing, e.g.
              float64 states that are float64 already).
    """

    def __init__(self, step: int, where: str = "forward", remedies: Sequence[str] | None = None) -> None:
        self.step = step
        self.where = where
        if where == "backward":
            message = (
                f"non-finite residual at backward (implicit-gradient) solver step {step}: the linear solve "
                "u = J^T u + g that ImplicitAdjoint runs at the fixed point diverged, as it does when f's Jacobian "
                "there has spectral radius >= 1 or the forward solve did not converge. Try fewer backward steps "
                "or a looser backward tolerance (ImplicitAdjoint max_steps/tol, the model's implicit_max_steps/"
                "implicit_tol: the gradient is then more approximate), a lower learning rate, or a gradient "
                "method without a backward solve (phantom, or the reversible solver with the reversible gradient)"
            )
        else:
            if remedies is None:
                remedies = ["a smaller beta", "a lower learning rate", "float64 solver states"]
            message = (
                f"non-finite residual at {where} solver step {step}: the fixed-point iteration diverged "
                f"(try {', '.join(remedies[:-1])}{' or ' if len(remedies) > 1 else ''}{remedies[-1]})"
            )
        super().__init__(message)



@dataclass
class Iteration:
    """A finished forward iteration.

    state:    the solver's final state (its `z` is the last iterate z_N); None once ReversibleAdjoint has
              saved what its backward needs (see `_ReversibleFunction.forward`).
    steps:    steps taken.
    trace:    the largest per-sample residual after each step.
    z:        the returned iterate [B, D]: `state.z`, or with `keep_best` each sample's lowest-residual
              iterate (rows of different steps; differentiable, a `torch.where` selection).
    residual: [B] float64, the relative residual of `z` (of what is returned, not necessarily z_N).
    group_steps: with per-group stopping, [B, G] long: the steps each group iterated before it froze
              (`steps` for a group that never did, 0 for one frozen from the start); else None.
    """

    state: IterateState | None
    steps: int
    trace: list[float]
    residual: Tensor
    z: Tensor | None
    group_steps: Tensor | None = None


def iterate(
    solver: Solver,
    problem: Problem,
    z0: Tensor,
    tol: float | None,
    max_steps: int,
    keep_best: bool = False,
    where: str = "forward",
    start: IterateState | None = None,
    groups: int | None = None,
    active: Tensor | None = None,
) -> Iteration:
    """Run `solver` from z0 for at most `max_steps` steps, stopping once the largest per-sample
    relative residual is below `tol` (tol=None: always `max_steps` steps). At least one step runs.
    With tol=None, `problem.trace` off and no `keep_best`, the residual is computed after the last step only.

    keep_best: return each sample's lowest-residual iterate of steps 1..N (z0 is never returned) instead of
    z_N; the solver itself carries on from its own state. `where` names the solve in a divergence error.

    start: a solver state to continue from (e.g. the end of a detached prefix, see `solve`'s `detached_steps`)
    instead of `solver.init(problem, z0)`; it already carries f(z), so no evaluation is spent on it.

    groups / active: per-group stopping (module docstring; needs `tol`, not `keep_best`): `active` [B, G] bool
    marks the groups that iterate at all (False: frozen from the start, e.g. padding positions)."""
    if groups is not None:
        return _iterate_groups(solver, problem, z0, tol, max_steps, groups, active, where, start)
    state = start if start is not None else solver.init(problem, z0)
    trace: list[float] = []
    skip_residuals = tol is None and not problem.trace and not keep_best
    best_z: Tensor | None = None
    best_residual: Tensor | None = None
    for step in range(1, max_steps + 1):
        state = solver.step(problem, state)
        if skip_residuals and step < max_steps:
            continue
        residual = relative_residual(state.z, state.fz)
        worst = float(residual.max())
        if not math.isfinite(worst):
            raise SolverDivergedError(step, where, _forward_remedies(solver, problem))
        trace.append(worst)
        if keep_best:
            if best_z is None or best_residual is None:
                best_z, best_residual = state.z, residual
            else:
                # Strictly lower: a tie keeps the earlier iterate. torch.where, not in-place indexing, so
                # UnrolledAdjoint differentiates through the selection (each row's gradient goes to the
                # iterate that row was taken from).
                better = residual < best_residual
                best_z = torch.where(better[:, None], state.z, best_z)
                best_residual = torch.where(better, residual, best_residual)
        if tol is not None and worst < tol:
            break
    if keep_best and best_z is not None and best_residual is not None:
        return Iteration(state=state, steps=step, trace=trace, residual=best_residual, z=best_z)
    return Iteration(state=state, steps=step, trace=trace, residual=residual, z=state.z)


def _iterate_groups(solver: Solver, problem: Problem, z0: Tensor, tol: float | None, max_steps: int, groups: int,
                    active: Tensor | None, where: str, start: IterateState | None) -> Iteration:
    """`iterate` with per-group stopping (see the module docstring)."""
    batch, width = z0.shape
    if tol is None:
        raise ValueError("per-group stopping (groups) needs a tol: the residual below which a group freezes")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or width % groups:
        raise ValueError(f"groups must be an integer >= 1 that divides the {width} state elements, got {groups!r}")
    moving = torch.ones(batch, groups, dtype=torch.bool, device=z0.device) if active is None else active.clone()
    if moving.shape != (batch, groups):
        raise ValueError(f"active must have shape {(batch, groups)}, got {tuple(moving.shape)}")
    group_steps = torch.zeros(batch, groups, dtype=torch.long, device=z0.device)
    state = start if start is not None else solver.init(problem, z0)
    trace: list[float] = []
    # Few reductions per step, and a Python flag for the common case (no group frozen yet): decoding runs this
    # loop per generated token, where each small tensor operation's overhead counts.
    all_moving = active is None or bool(active.all())
    step = 0
    if all_moving or bool(moving.any()):
        for step in range(1, max_steps + 1):
            if all_moving:
                state = solver.step(problem, state)
            else:
                keep = _element_mask(~moving, width)
                new = solver.step(problem, state, hold=functools.partial(_where_kept, keep))
                state = hold_frozen(new, state, keep)  # f(z) too: a frozen part keeps the f(z) it froze with
            group_steps += moving
            residual = group_residual(state.z, state.fz, groups)  # [B, G]
            if problem.trace:
                trace.append(float(relative_residual(state.z, state.fz).max()))
            if all_moving:
                low, high = (float(v) for v in residual.aminmax())
                if not math.isfinite(high):
                    raise SolverDivergedError(step, where, _forward_remedies(solver, problem))
                if high < tol:  # every group below tol at once: all frozen
                    break
                if low < tol:
                    moving = residual >= tol
                    all_moving = False
            else:
                if not math.isfinite(float(residual.max())):
                    raise SolverDivergedError(step, where, _forward_remedies(solver, problem))
                moving &= ~(residual < tol)
                if not bool(moving.any()):
                    break
    final = relative_residual(state.z, state.fz)
    if not problem.trace:
        trace = [float(final.max())]
    return Iteration(state=state, steps=step, trace=trace, residual=final,
                     z=state.z, group_steps=group_steps)


def _where_kept(keep: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(keep, old, new)


def _element_mask(frozen: Tensor, width: int) -> Tensor:
    """[B, G] bool per group -> [B, D] bool per state element (groups are contiguous, D / G each)."""
    batch, groups = frozen.shape
    return frozen[:, :, None].expand(batch, groups, width // groups).reshape(batch, width)


def hold_frozen(new: IterateState, old: IterateState, keep: Tensor) -> IterateState:
    """`new` with the values of every [B, D] tensor of the solver state taken from `old` where `keep` [B, D].

    Lists in the state (Anderson's and Broyden's histories) are left as `new` has them: they only ever mix a
    sample's own rows, and the parts of a frozen group are never read again."""
    batch, width = keep.shape
    values = {}
    for f in fields(new):
        value = getattr(new, f.name)
        if isinstance(value, Tensor) and value.shape == (batch, width):
            value = torch.where(keep, getattr(old, f.name), value)
        values[f.name] = value
    return type(new)(**values)


def group_residual(z: Tensor, fz: Tensor, groups: int) -> Tensor:
    """`relative_residual` of each of the `groups` contiguous parts of flat [B, D] states: float64 [B, G]."""
    batch = z.shape[0]
    return relative_residual(z.reshape(batch * groups, -1), fz.reshape(batch * groups, -1)).view(batch, groups)


def _forward_remedies(solver: Solver, problem: Problem) -> list[str]:
    """What could stop a forward divergence, given this solver and state dtype (only what would change)."""
    beta = getattr(solver, "beta", None)
    remedies = [f"a smaller beta (now {beta:g})" if beta is not None else
                "a damped solver (relaxed, or anderson with beta < 1)", "a lower learning rate"]
    if getattr(problem, "state_dtype", torch.float64) != torch.float64:
        remedies.append("float64 solver states")
    return remedies
