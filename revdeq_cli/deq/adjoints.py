"""Gradient methods: how backpropagation runs through a fixed-point solve.

    UnrolledAdjoint    autograd through every iteration. Exact for the truncated iteration; memory
                       grows linearly with the number of steps. The reference the others are tested against.
    ReversibleAdjoint  walks the `Reversible` iteration backwards algebraically (docs/DESIGN.md §1). Exact, the
                       same numbers as UnrolledAdjoint up to rounding, with memory independent of the
                       number of steps; costs 2N forward+VJP evaluations of f in the backward pass.
    ImplicitAdjoint    implicit function theorem: solves `u = J^T u + dL/dz*` at the returned point.
                       Approximate: exact only at an exact fixed point and a converged backward solve.
    PhantomAdjoint     k damped unrolled steps from the (detached) fixed point; k = 1, beta = 1 is
                       Jacobian-free backprop. Approximate.

All four are `GradientMethod`s: `solve` calls `run(problem, solver, z0, params, tol, max_steps, keep_best,
start)`, which hands a method one `Request`; the method runs the forward iteration (deq/iteration.py,
`request.iterate(graph=...)`) and attaches its gradient to the returned point.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from revdeq_cli.deq.iteration import Iteration, SolverDivergedError, iterate
from revdeq_cli.deq.problem import Problem
from revdeq_cli.deq.solvers import Broyden, IterateState, Reversible, Solver
from revdeq_cli.deq.state import tree_leaves

# Iteration, SolverDivergedError and iterate live in deq/iteration.py; imported from here too.
__all__ = ["AdjointOutput", "BackwardStats", "GradientMethod", "ImplicitAdjoint", "Iteration", "PhantomAdjoint",
           "Request", "ReversibleAdjoint", "SolverDivergedError", "UnrolledAdjoint", "iterate"]

KEEP_BEST_REVERSIBLE = (
    "keep_best is not available for the Reversible solver: its gradient reverses the iteration from the last "
    "iterate (y_N, z_N), so the returned point must be z_N; stop earlier with tol/max_steps instead"
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
class AdjointOutput:
    z: Tensor  # [B, D] in the state dtype, attached to the autograd graph as the method decides
    iteration: Iteration
    backward: BackwardStats = field(default_factory=BackwardStats)


@dataclass(frozen=True)
class Request:
    """One solve, as `solve` hands it to a gradient method.

    problem: f and x, flattened states; solver: the forward solver; z0: [B, D] in the state dtype;
    params: f's parameters that want gradients; tol / max_steps: the stop rule (tol None = always max_steps);
    keep_best: return each sample's lowest-residual iterate; start: a detached solver state to continue from
    (the end of `detached_steps`), else the solver starts from z0; groups / active: per-group stopping
    (deq/iteration.py), None: the batch stops together."""

    problem: Problem
    solver: Solver
    z0: Tensor
    params: list[Tensor]
    tol: float | None
    max_steps: int
    keep_best: bool = False
    start: IterateState | None = None
    groups: int | None = None
    active: Tensor | None = None

    def iterate(self, *, graph: bool) -> Iteration:
        """The forward iteration, recorded by autograd (`graph=True`) or not."""
        with contextlib.nullcontext() if graph else torch.no_grad():
            return iterate(self.solver, self.problem, self.z0, self.tol, self.max_steps, self.keep_best,
                           start=self.start, groups=self.groups, active=self.active)


class GradientMethod:
    """How backpropagation runs through a fixed-point solve: the base of the four methods above. A method
    implements `differentiate(request)`; `run` is the one signature `solve` calls."""

    def run(
        self, problem: Problem, solver: Solver, z0: Tensor, params: list[Tensor], tol: float | None, max_steps: int,
        keep_best: bool = False, start: IterateState | None = None, groups: int | None = None,
        active: Tensor | None = None,
    ) -> AdjointOutput:
        return self.differentiate(Request(problem, solver, z0, params, tol, max_steps, keep_best, start, groups,
                                          active))

    def differentiate(self, request: Request) -> AdjointOutput:
        raise NotImplementedError


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


class UnrolledAdjoint(GradientMethod):
    """Backpropagate through every solver iteration with autograd (exact; memory grows with steps)."""

    def differentiate(self, request: Request) -> AdjointOutput:
        iteration = request.iterate(graph=True)
        return AdjointOutput(z=iteration.z, iteration=iteration)

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
class ImplicitAdjoint(GradientMethod):
    """Implicit-function-theorem gradients (classic DEQ). Approximate.

    The forward solve runs without a graph and returns z* (the last or, with keep_best, the best iterate)
    itself, so `Solution.residual` describes the returned value. The gradient is attached through one more
    evaluation `f(z*)` with a graph (value-neutral: the output is `z* + (f(z*) - f(z*).detach())`), and the
    incoming gradient g is replaced by the solution of `u = J^T u + g` (J = df/dz at z*), found with
    `solver` (default Broyden(), as revdeq_cli.solver_facts says) to relative tolerance `tol` in at most
    `max_steps` steps; a non-finite residual there raises `SolverDivergedError` with where="backward".
    Without autograd (no_grad) the extra evaluation is skipped. Gradients with respect to z0 are zero (the
    fixed point does not depend on the start).
    """

    tol: float = 1e-6
    max_steps: int = 50
    solver: Solver | None = None

    def differentiate(self, request: Request) -> AdjointOutput:
        problem = request.problem
        iteration = request.iterate(graph=False)
        stats = BackwardStats()
        z_star = iteration.z.detach()
        if not torch.is_grad_enabled():
            return AdjointOutput(z=z_star, iteration=iteration, backward=stats)
        z_star.requires_grad_(True)
        fz = problem.evaluate(z_star)
        if not fz.requires_grad:
            return AdjointOutput(z=z_star.detach(), iteration=iteration, backward=stats)
        backward_solver = self.solver or Broyden()  # solver_facts: Broyden for every solver

        def implicit_grad(g: Tensor) -> Tensor:
            linear = _BackwardProblem(fz=fz, z=z_star, g=g, problem=problem)
            with torch.enable_grad():
                solved = iterate(backward_solver, linear, g, self.tol, self.max_steps,  # type: ignore[arg-type]
                                 where="backward")
            stats.nfe += linear.nfe
            return solved.z

        # An identity Function, not a hook on fz: a hook's closure holds fz, and fz's graph holds the hook, a
        # cycle through C++ that Python's garbage collector cannot see, which kept every step's graph alive.
        carrying = _ReplaceGradient.apply(fz, implicit_grad)
        return AdjointOutput(z=_value_of(z_star, carrying=carrying, problem=problem), iteration=iteration,
                             backward=stats)


class _ReplaceGradient(torch.autograd.Function):
    """Identity forward; backward passes `new_grad(g)` on in place of the incoming gradient g."""

    @staticmethod
    def forward(ctx, value: Tensor, new_grad: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.new_grad = new_grad
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.new_grad(grad), None


def _value_of(z: Tensor, carrying: Tensor, problem: Problem) -> Tensor:
    """`z`'s value exactly (x - x.detach() is exactly zero) with `carrying`'s graph: the gradient methods
    that differentiate extra evaluations return the solver's point, whose residual `solve` reports."""
    with problem.arithmetic():
        return z.detach() + (carrying - carrying.detach())


@dataclass(frozen=True)
class PhantomAdjoint(GradientMethod):
    """Phantom gradients: from the detached fixed point z* (the last or, with keep_best, the best iterate),
    `steps` damped steps `z <- (1 - beta) z + beta f(z)` run with a graph, and backprop goes through those
    only. The returned value is z* itself (so `Solution.residual` describes it) carrying those steps'
    graph. Approximate; steps=1, beta=1 is Jacobian-free backprop. Without autograd (no_grad) the extra
    steps are skipped. Gradients with respect to z0 are zero."""

    steps: int = 1
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"PhantomAdjoint: steps must be >= 1, got {self.steps}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"PhantomAdjoint: beta must be in (0, 1], got {self.beta}")

    def differentiate(self, request: Request) -> AdjointOutput:
        problem = request.problem
        iteration = request.iterate(graph=False)
        z_star = iteration.z.detach()
        if not torch.is_grad_enabled():
            return AdjointOutput(z=z_star, iteration=iteration)
        z = z_star
        for _ in range(self.steps):
            fz = problem.evaluate(z)
            with problem.arithmetic():
                z = fz if self.beta == 1.0 else (1 - self.beta) * z + self.beta * fz
        out = _value_of(z_star, carrying=z, problem=problem) if z.requires_grad else z_star
        return AdjointOutput(z=out, iteration=iteration, backward=BackwardStats(nfe=self.steps))


class ReversibleAdjoint(GradientMethod):
    """Exact, constant-memory gradients for the `Reversible` solver (docs/DESIGN.md §1; arXiv 2509.12917).

    The forward iteration (y[0] = z[0] = z0, or the state `start` gives) runs without a graph,

        (F1)  y[n+1] = (1 - beta) * y[n] + beta * f(z[n],   x)
        (F2)  z[n+1] = (1 - beta) * z[n] + beta * f(y[n+1], x)

    and keeps only (y[N], z[N], y[0], z[0]). The backward pass rebuilds the iterates from the last one
    by inverting (F2) and then (F1), for n = N-1 ... 0:

        (R1)  z[n] = (z[n+1] - beta * f(y[n+1], x)) / (1 - beta)
        (R2)  y[n] = (y[n+1] - beta * f(z[n],   x)) / (1 - beta)

    evaluating f with a graph once at y[n+1] and once at z[n] and taking vector-Jacobian products there
    (gz = dL/dz, gy = dL/dy; gz[N] = dL/dz*, gy[N] = 0; J_a^T v the VJP of f at a):

        (G1)  gy[n+1] += beta * J_{y[n+1]}^T gz[n+1]     (theta, x grads += the same VJP)
        (G2)  gz[n]    = (1 - beta) * gz[n+1] + beta * J_{z[n]}^T gy[n+1]   (theta, x grads += the VJP)
        (G3)  gy[n]    = (1 - beta) * gy[n+1]

    and dL/dz0 = gz[0] + gy[0] (y[0] = z[0] = z0). `BackwardStats.reconstruction_error` is
    max |z[0]_rebuilt - z[0]|, |y[0]_rebuilt - y[0]|.

    with parameter and x gradients accumulated from the same products. The result equals autograd
    through the unrolled iteration up to rounding, provided f is deterministic (no dropout mask or
    batch-norm statistics that change between forward and backward). f's parameters are inputs of
    the autograd Function, so DDP and gradient hooks see ordinary parameter gradients.
    """

    def differentiate(self, request: Request) -> AdjointOutput:
        problem, solver, z0, params = request.problem, request.solver, request.z0, request.params
        if not isinstance(solver, Reversible):
            raise ValueError(
                f"ReversibleAdjoint needs the Reversible solver (got {type(solver).__name__}): only its "
                "iteration can be run backwards; use UnrolledAdjoint, ImplicitAdjoint or PhantomAdjoint instead"
            )
        if request.keep_best:
            raise ValueError(KEEP_BEST_REVERSIBLE)
        x_leaves = _grad_leaves(problem)
        if not (torch.is_grad_enabled() and (z0.requires_grad or x_leaves or params)):
            iteration = request.iterate(graph=False)
            return AdjointOutput(z=iteration.state.z, iteration=iteration)
        if request.groups is not None:
            raise ValueError(
                "per-group stopping (groups) is for inference: the reversible backward pass reverses every step "
                "of every position; run it under torch.no_grad(), or use UnrolledAdjoint to differentiate it"
            )
        run = _ReversibleRun(problem=problem, solver=solver, tol=request.tol, max_steps=request.max_steps,
                             n_x=len(x_leaves), start=request.start)
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
    start: IterateState | None = None  # a detached solver state to continue from (y_k, z_k); None: y0 = z0
    iteration: Iteration | None = None  # after the forward: steps, trace and residual only (no tensors of the graph)
    steps: int = 0
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
        iteration = iterate(run.solver, run.problem, z0, run.tol, run.max_steps, start=run.start)
        state = iteration.state
        y0 = run.start.y if run.start is not None else z0  # type: ignore[attr-defined]
        run.start = None  # saved below; `run` must not keep tensors alive beyond the graph
        # `run` (reachable from the output's grad_fn through ctx) keeps only the figures `solve` reports: holding
        # the final state there would make the output tensor reach itself through its own graph, a reference
        # cycle that only Python's cycle collector frees, so every training step's solver states and graph lived
        # on until a collection ran (process RSS grew by hundreds of MiB over a run).
        run.iteration = replace(iteration, state=None, z=None)
        run.steps = iteration.steps
        ctx.run = run
        ctx.save_for_backward(z0, y0, state.y, state.z, *inputs)
        return state.z

    @staticmethod
    def backward(ctx, grad_z: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        run: _ReversibleRun = ctx.run
        z0, y0, y, z, *inputs = ctx.saved_tensors
        n_inputs = len(inputs)
        if grad_z is None:
            return (None, None, *([None] * n_inputs))
        problem, b, steps = run.problem, run.solver.beta, run.steps
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

        # Entering step n: y = y[n+1], z = z[n+1], gz = gz[n+1], gy = gy[n+1] (before G1). Equations: the
        # class docstring.
        with torch.enable_grad():
            for n in reversed(range(steps)):
                fy, jy = vjp(y, b * gz, check=n == steps - 1)  # f(y[n+1]), beta * J_{y[n+1]}^T gz[n+1]
                with torch.no_grad(), problem.arithmetic():
                    z = (z - b * fy) / (1 - b)  # (R1) z[n]
                    gy = gy + jy  # (G1) gy[n+1] += beta * J_{y[n+1]}^T gz[n+1]
                fz, jz = vjp(z, b * gy)  # f(z[n]), beta * J_{z[n]}^T gy[n+1]
                with torch.no_grad(), problem.arithmetic():
                    y = (y - b * fz) / (1 - b)  # (R2) y[n]
                    gz = (1 - b) * gz + jz  # (G2) gz[n]
                    gy = (1 - b) * gy  # (G3) gy[n]
        # Now y = y[0], z = z[0], gz = gz[0], gy = gy[0]: dL/dz0 = gz[0] + gy[0].
        run.stats.nfe += 2 * steps
        run.stats.reconstruction_error = float(torch.maximum((z - z0).abs().max(), (y - y0).abs().max()))
        grad_inputs = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grads)]
        return (None, gz + gy if ctx.needs_input_grad[1] else None, *grad_inputs)
