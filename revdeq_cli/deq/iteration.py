"""The forward iteration of a fixed-point solve: run a solver from z0 until the residual is below tol.

    iteration = iterate(solver, problem, z0, tol, max_steps)   # -> Iteration(state, steps, trace, residual, z)

Every gradient method (deq/adjoints.py) runs its forward pass through `iterate`, with or without a graph;
a NaN or infinite residual raises `SolverDivergedError` naming the step and the remedies that apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    """

    state: IterateState | None
    steps: int
    trace: list[float]
    residual: Tensor
    z: Tensor | None


def iterate(
    solver: Solver,
    problem: Problem,
    z0: Tensor,
    tol: float | None,
    max_steps: int,
    keep_best: bool = False,
    where: str = "forward",
    start: IterateState | None = None,
) -> Iteration:
    """Run `solver` from z0 for at most `max_steps` steps, stopping once the largest per-sample
    relative residual is below `tol` (tol=None: always `max_steps` steps). At least one step runs.
    With tol=None, `problem.trace` off and no `keep_best`, the residual is computed after the last step only.

    keep_best: return each sample's lowest-residual iterate of steps 1..N (z0 is never returned) instead of
    z_N; the solver itself carries on from its own state. `where` names the solve in a divergence error.

    start: a solver state to continue from (e.g. the end of a detached prefix, see `solve`'s `detached_steps`)
    instead of `solver.init(problem, z0)`; it already carries f(z), so no evaluation is spent on it."""
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


def _forward_remedies(solver: Solver, problem: Problem) -> list[str]:
    """What could stop a forward divergence, given this solver and state dtype (only what would change)."""
    beta = getattr(solver, "beta", None)
    remedies = [f"a smaller beta (now {beta:g})" if beta is not None else
                "a damped solver (relaxed, or anderson with beta < 1)", "a lower learning rate"]
    if getattr(problem, "state_dtype", torch.float64) != torch.float64:
        remedies.append("float64 solver states")
    return remedies
