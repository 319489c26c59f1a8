"""Build solvers and gradient methods from the names used in configs and on the command line (the names
and each solver's defaults: revdeq_cli.solver_facts)."""

from __future__ import annotations

import torch

from revdeq_cli.deq.adjoints import ImplicitAdjoint, PhantomAdjoint, ReversibleAdjoint, UnrolledAdjoint
from revdeq_cli.deq.solve import Adjoint
from revdeq_cli.deq.solvers import Anderson, Broyden, Picard, Relaxed, Reversible, Solver, as_dtype
from revdeq_cli.solver_facts import ADJOINTS, SOLVER_FACTS, SOLVERS

__all__ = ["ADJOINTS", "SOLVERS", "make_adjoint", "make_solver"]


def make_solver(
    name: str,
    *,
    beta: float = 0.5,
    state_dtype: torch.dtype | str | None = None,
    anderson_m: int = 5,
) -> Solver:
    """`name` in SOLVERS. beta is used by reversible, relaxed and anderson (its mixing). state_dtype
    None keeps each solver's default (float64 for reversible, the dtype of z0 otherwise)."""
    dtype = as_dtype(state_dtype)
    if name == "reversible":
        return Reversible(beta=beta) if dtype is None else Reversible(beta=beta, state_dtype=dtype)
    if name == "picard":
        return Picard(state_dtype=dtype)
    if name == "relaxed":
        return Relaxed(beta=beta, state_dtype=dtype)
    if name == "anderson":
        return Anderson(m=anderson_m, beta=beta, state_dtype=dtype)
    if name == "broyden":
        return Broyden(state_dtype=dtype)
    raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")


def make_adjoint(
    name: str,
    *,
    implicit_tol: float = 1e-6,
    implicit_max_steps: int = 50,
    phantom_steps: int = 1,
    phantom_beta: float = 1.0,
    solver: str = "reversible",
) -> Adjoint:
    """`name` in ADJOINTS, for the forward solver `solver` (its `backward_solver` solves the implicit
    gradient's backward system: Broyden for every solver, revdeq_cli.solver_facts)."""
    if name == "reversible":
        return ReversibleAdjoint()
    if name == "unrolled":
        return UnrolledAdjoint()
    if name == "implicit":
        backward = make_solver(SOLVER_FACTS[solver].backward_solver)
        return ImplicitAdjoint(tol=implicit_tol, max_steps=implicit_max_steps, solver=backward)
    if name == "phantom":
        return PhantomAdjoint(steps=phantom_steps, beta=phantom_beta)
    raise ValueError(f"unknown gradient method {name!r}; choose one of {', '.join(ADJOINTS)}")
