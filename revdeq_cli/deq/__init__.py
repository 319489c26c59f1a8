"""The solver core: fixed-point solvers, gradient methods and `solve`. Depends on torch only.

    from revdeq_cli import deq
    sol = deq.solve(f, z0, x, solver=deq.Reversible(beta=0.5), adjoint=deq.ReversibleAdjoint(),
                    tol=1e-3, max_steps=8)
    sol.z, sol.steps, sol.residual, sol.nfe, sol.trace, sol.backward
"""

from revdeq_cli.deq.adjoints import (
    BackwardStats,
    GradientMethod,
    ImplicitAdjoint,
    PhantomAdjoint,
    ReversibleAdjoint,
    UnrolledAdjoint,
)
from revdeq_cli.deq.factory import ADJOINTS, SOLVERS, make_adjoint, make_solver
from revdeq_cli.deq.iteration import Iteration, SolverDivergedError, iterate
from revdeq_cli.deq.solve import Adjoint, Solution, solve
from revdeq_cli.deq.solvers import Anderson, Broyden, Picard, Relaxed, Reversible, Solver

__all__ = [
    "ADJOINTS",
    "SOLVERS",
    "Adjoint",
    "Anderson",
    "BackwardStats",
    "Broyden",
    "GradientMethod",
    "ImplicitAdjoint",
    "Iteration",
    "PhantomAdjoint",
    "Picard",
    "Relaxed",
    "Reversible",
    "ReversibleAdjoint",
    "Solution",
    "Solver",
    "SolverDivergedError",
    "UnrolledAdjoint",
    "iterate",
    "make_adjoint",
    "make_solver",
    "solve",
]
