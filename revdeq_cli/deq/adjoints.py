"""Gradient methods: how backpropagation runs through a fixed-point solve.

    UnrolledAdjoint    autograd through every iteration. Exact for the truncated iteration; memory
                       grows linearly with the number of steps. The reference the others are tested against.
    ReversibleAdjoint  walks the `Reversible` iteration backwards algebraically (DESIGN §1). Exact, the
                       same numbers as UnrolledAdjoint up to rounding, with memory independent of the
                       number of steps; costs 2N forward+VJP evaluations of f in the backward pass.
    ImplicitAdjoint    implicit function theorem: solves `u = J^T u + dL/dz*` at the returned point.
                       Approximate: exact only at an exact fixed point and a converged backward solve.
    PhantomAdjoint     k damped unrolled steps from the (detached) fixed point; k = 1, beta = 1 is
                       Jacobian-free backprop. Approximate.

Each has `run(problem, solver, z0, params, tol, max_steps) -> AdjointOutput`; `solve` picks one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from revdeq_cli.deq.problem import Problem
from revdeq_cli.deq.solvers import Anderson, IterateState, Reversible, Solver
from revdeq_cli.deq.state import relative_residual, tree_leaves


class SolverDivergedError(FloatingPointError):
    """The residual became NaN or infinite; `step` is the solver step at which it first appeared."""

    def __init__(self, step: int, where: str = "forward") -> None:
        self.step = step
        super().__init__(
            f"non-finite residual at {where} solver step {step}: the fixed-point iteration diverged "
            "(try a smaller beta, a lower learning rate, or float64 solver states)"
        )


@dataclass
class BackwardStats:
    """Statistics of one backward pass, filled in when autograd runs it.

    nfe: evaluations of f (each with its vector-Jacobian product) made by the backward pass.
    reconstruction_error: ReversibleAdjoint only: max |z0_rebuilt - z0| over y and z after reversing
        all N steps, a direct measure of rounding-error growth in the reversal (nan otherwise).
    """

    nfe: int = 0
    reconstruction_error: float = math.nan


@dataclass
class Iteration:
    """A finished forward iteration: final solver state, steps taken, max residual per step, and the
    final per-sample residual [B] (float64)."""

    state: IterateState
    steps: int
    trace: list[float]
    residual: Tensor


def iterate(solver: Solver, problem: Problem, z0: Tensor, tol: float | None, max_steps: int) -> Iteration:
    """Run `solver` from z0 for at most `max_steps` steps, stopping once the largest per-sample
    relative residual is below `tol` (tol=None: always `max_steps` steps). At least one step runs.
    With tol=None and `problem.trace` off, the residual is computed after the last step only."""
    state = solver.init(problem, z0)
    trace: list[float] = []
    skip_residuals = tol is None and not problem.trace
    for step in range(1, max_steps + 1):
        state = solver.step(problem, state)
        if skip_residuals and step < max_steps:
            continue
        residual = relative_residual(state.z, state.fz)
        worst = float(residual.max())
        if not math.isfinite(worst):
            raise SolverDivergedError(step)
        trace.append(worst)
        if tol is not None and worst < tol:
            break
    return Iteration(state=state, steps=step, trace=trace, residual=residual)


@dataclass
class AdjointOutput:
    z: Tensor  # [B, D] in the state dtype, attached to the autograd graph as the method decides
    iteration: Iteration
    backward: BackwardStats = field(default_factory=BackwardStats)


def _accumulate(total: list[Tensor | None], new: Sequence[Tensor | None]) -> None:
    # In place after the first: the first gradient autograd.grad returned is a fresh tensor we own.
    for i, g in enumerate(new):
        if g is not None:
            if total[i] is None:
                total[i] = g
            else:
                total[i].add_(g)


def _grad_leaves(problem: Problem) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(problem.x) if leaf.requires_grad]


class UnrolledAdjoint:
    """Backpropagate through every solver iteration with autograd (exact; memory grows with steps)."""

    def run(
        self, problem: Problem, solver: Solver, z0: Tensor, params: list[Tensor], tol: float | None, max_steps: int
    ) -> AdjointOutput:
        iteration = iterate(solver, problem, z0, tol, max_steps)
        return AdjointOutput(z=iteration.state.z, iteration=iteration)

    def __repr__(self) -> str:
        return "UnrolledAdjoint()"


@dataclass
class _BackwardProblem:
    """The linear fixed-point problem `u = J^T u + g` of the implicit backward pass, shaped so the
    forward solvers can solve it (`evaluate`, `arithmetic`, `nfe`)."""

    fz: Tensor
    z: Tensor
    g: Tensor
    problem: Problem
    nfe: int = 0
    trace: bool = True

    def evaluate(self, u: Tensor) -> Tensor:
        self.nfe += 1
        (vjp,) = torch.autograd.grad(self.fz, self.z, u, retain_graph=True)
        return vjp + self.g

    def arithmetic(self) -> contextlib.AbstractContextManager:
        return self.problem.arithmetic()


@dataclass(frozen=True)
class ImplicitAdjoint:
    """Implicit-function-theorem gradients (classic DEQ). Approximate.

    The forward solve runs without a graph; the output is one more evaluation `f(z*)` attached to the
    graph, and its incoming gradient g is replaced by the solution of `u = J^T u + g` (J = df/dz at z*),
    found with `solver` (default Anderson(m=5)) to relative tolerance `tol` in at most `max_steps` steps.
    Gradients with respect to z0 are zero (the fixed point does not depend on the start).
    """

    tol: float = 1e-6
    max_steps: int = 50
    solver: Solver | None = None

    def run(
        self, problem: Problem, solver: Solver, z0: Tensor, params: list[Tensor], tol: float | None, max_steps: int
    ) -> AdjointOutput:
        with torch.no_grad():
            iteration = iterate(solver, problem, z0, tol, max_steps)
        stats = BackwardStats()
        z_star = iteration.state.z.detach().requires_grad_(torch.is_grad_enabled())
        fz = problem.evaluate(z_star)
        if fz.requires_grad:
            backward_solver = self.solver or Anderson(m=5)
            inside = [False]

            def implicit_grad(g: Tensor) -> Tensor:
                # The VJPs below re-enter fz's graph and would fire this hook again: pass those through.
                if inside[0]:
                    return g
                inside[0] = True
                try:
                    linear = _BackwardProblem(fz=fz, z=z_star, g=g, problem=problem)
                    with torch.enable_grad():
                        solved = iterate(backward_solver, linear, g, self.tol, self.max_steps)  # type: ignore[arg-type]
                finally:
                    inside[0] = False
                stats.nfe += linear.nfe
                return solved.state.z

            fz.register_hook(implicit_grad)
        return AdjointOutput(z=fz, iteration=iteration, backward=stats)


@dataclass(frozen=True)
class PhantomAdjoint:
    """Phantom gradients: from the detached fixed point z*, `steps` damped steps
    `z <- (1 - beta) z + beta f(z)` run with a graph, and backprop goes through those only. Approximate;
    steps=1, beta=1 is Jacobian-free backprop. Gradients with respect to z0 are zero."""

    steps: int = 1
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"PhantomAdjoint: steps must be >= 1, got {self.steps}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"PhantomAdjoint: beta must be in (0, 1], got {self.beta}")

    def run(
        self, problem: Problem, solver: Solver, z0: Tensor, params: list[Tensor], tol: float | None, max_steps: int
    ) -> AdjointOutput:
        with torch.no_grad():
            iteration = iterate(solver, problem, z0, tol, max_steps)
        z = iteration.state.z.detach()
        for _ in range(self.steps):
            fz = problem.evaluate(z)
            with problem.arithmetic():
                z = fz if self.beta == 1.0 else (1 - self.beta) * z + self.beta * fz
        return AdjointOutput(z=z, iteration=iteration, backward=BackwardStats(nfe=self.steps))


class ReversibleAdjoint:
    """Exact, constant-memory gradients for the `Reversible` solver (DESIGN §1).

    The forward iteration runs without a graph and keeps only (y[N], z[N], z0). The backward pass
    rebuilds z[n], y[n] from z[n+1], y[n+1] algebraically, evaluating f with a graph once at y[n+1]
    and once at z[n] and taking vector-Jacobian products there:

        gy[n+1] += beta * J_{y[n+1]}^T gz[n+1]
        gy[n]    = (1 - beta) * gy[n+1]
        gz[n]    = (1 - beta) * gz[n+1] + beta * J_{z[n]}^T gy[n+1]

    with parameter and x gradients accumulated from the same products. The result equals autograd
    through the unrolled iteration up to rounding, provided f is deterministic (no dropout mask or
    batch-norm statistics that change between forward and backward). f's parameters are inputs of
    the autograd Function, so DDP and gradient hooks see ordinary parameter gradients.
    """

    def run(
        self, problem: Problem, solver: Solver, z0: Tensor, params: list[Tensor], tol: float | None, max_steps: int
    ) -> AdjointOutput:
        if not isinstance(solver, Reversible):
            raise ValueError(
                f"ReversibleAdjoint needs the Reversible solver (got {type(solver).__name__}): only its "
                "iteration can be run backwards; use UnrolledAdjoint, ImplicitAdjoint or PhantomAdjoint instead"
            )
        x_leaves = _grad_leaves(problem)
        if not (torch.is_grad_enabled() and (z0.requires_grad or x_leaves or params)):
            with torch.no_grad():
                iteration = iterate(solver, problem, z0, tol, max_steps)
            return AdjointOutput(z=iteration.state.z, iteration=iteration)
        run = _ReversibleRun(problem=problem, solver=solver, tol=tol, max_steps=max_steps, n_x=len(x_leaves))
        z = _ReversibleFunction.apply(run, z0, *x_leaves, *params)
        return AdjointOutput(z=z, iteration=run.iteration, backward=run.stats)

    def __repr__(self) -> str:
        return "ReversibleAdjoint()"


@dataclass
class _ReversibleRun:
    """What the autograd Function needs besides tensors, and where it leaves its results."""

    problem: Problem
    solver: Reversible
    tol: float | None
    max_steps: int
    n_x: int
    iteration: Iteration | None = None
    stats: BackwardStats = field(default_factory=BackwardStats)


def _unlisted_grad_leaves(output: Tensor, listed: Sequence[Tensor]) -> int:
    """Count leaf tensors requiring grad that `output` depends on but that are not in `listed`.

    Such tensors (parameters f closes over but that were not passed as `params`) would silently get no
    gradient from the reversible backward pass, the bug of an earlier port; we refuse instead."""
    listed_ids = {id(t) for t in listed}
    seen, stack, unlisted = set(), [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in listed_ids:
            unlisted += 1
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return unlisted


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _ReversibleRun, z0: Tensor, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        run.iteration = iterate(run.solver, run.problem, z0, run.tol, run.max_steps)
        state = run.iteration.state
        ctx.run = run
        ctx.save_for_backward(z0, state.y, state.z, *inputs)
        return state.z

    @staticmethod
    def backward(ctx, grad_z: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        run: _ReversibleRun = ctx.run
        z0, y, z, *inputs = ctx.saved_tensors
        n_inputs = len(inputs)
        if grad_z is None:
            return (None, None, *([None] * n_inputs))
        problem, b, steps = run.problem, run.solver.beta, run.iteration.steps
        # Fresh leaves for x so its gradient comes out of autograd.grad; parameters are used as they are.
        x_inputs = [t.detach().requires_grad_(True) for t in inputs[: run.n_x]]
        params = list(inputs[run.n_x :])
        x = problem.with_x(x_inputs) if run.n_x else problem.x
        wanted = x_inputs + params
        grads: list[Tensor | None] = [None] * len(wanted)
        gz, gy = grad_z.to(z.dtype), torch.zeros_like(y)

        def vjp(at: Tensor, cotangent: Tensor, check: bool = False) -> tuple[Tensor, Tensor]:
            """f at `at` with a graph -> (f(at) detached, J^T cotangent); other grads accumulated."""
            at = at.detach().requires_grad_(True)
            fa = problem.evaluate(at, x)
            if check and _unlisted_grad_leaves(fa, [at, *wanted]):
                raise ValueError(
                    "f depends on tensors that require grad but were not passed to solve(): give "
                    "params=[...] (or make f an nn.Module) so ReversibleAdjoint can return their gradients"
                )
            out = torch.autograd.grad(fa, [at, *wanted], cotangent, allow_unused=True)
            _accumulate(grads, out[1:])
            return fa.detach(), (out[0] if out[0] is not None else torch.zeros_like(at))

        with torch.enable_grad():
            for n in reversed(range(steps)):
                fy, jy = vjp(y, b * gz, check=n == steps - 1)
                with torch.no_grad(), problem.arithmetic():
                    z = (z - b * fy) / (1 - b)
                    gy = gy + jy
                fz, jz = vjp(z, b * gy)
                with torch.no_grad(), problem.arithmetic():
                    y = (y - b * fz) / (1 - b)
                    gz = (1 - b) * gz + jz
                    gy = (1 - b) * gy
        run.stats.nfe += 2 * steps
        run.stats.reconstruction_error = float(torch.maximum((z - z0).abs().max(), (y - z0).abs().max()))
        grad_inputs = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grads)]
        return (None, gz + gy if ctx.needs_input_grad[1] else None, *grad_inputs)
