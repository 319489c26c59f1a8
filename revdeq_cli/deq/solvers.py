"""Fixed-point solvers: each an object with `init` and `step` over flat [B, D] states.

Every solver state carries `z` (the current iterate) and `fz = f(z)`, so the relative residual
`||z - f(z)|| / (1e-5 + ||f(z)||)` is known after every step at no extra evaluation. Evaluation counts:

    Picard, Relaxed, Anderson, Broyden   1 + N   (f(z0), then one per step)
    Reversible                           1 + 2N  (f(z0), then f(y[n+1]) and f(z[n+1]) per step)

The arithmetic is plain torch, so autograd can run through it (`UnrolledAdjoint`). All solvers except
`Reversible` are the classic-DEQ baselines; `Reversible` is the algebraically invertible two-state
iteration of McCallum, Arora & Foster (2025), docs/DESIGN.md §1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from revdeq_cli.deq.problem import Problem
from revdeq_cli.solver_facts import BETA_HIGH, BETA_LOW, SOLVER_FACTS

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """Accept `torch.float64` or its name ("float64"); None passes through."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"state_dtype must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def _check_beta(beta: float, name: str) -> float:
    """`beta` as a float if it obeys solver `name`'s rule (revdeq_cli.solver_facts), else ValueError."""
    beta, facts = float(beta), SOLVER_FACTS[name.lower()]
    if not BETA_LOW < beta < BETA_HIGH or (not facts.beta_one_allowed and beta == 1.0):
        raise ValueError(f"{name}: beta must be {facts.beta_rule()}, got {beta}")
    return beta


@dataclass
class IterateState:
    """State of the single-iterate solvers: the iterate `z` and `fz = f(z)`, both [B, D]."""

    z: Tensor
    fz: Tensor


# `hold(new, old)` -> the iterate to evaluate f at: `new`, with the frozen parts' values taken from `old`
# (per-group stopping, deq/iteration.py). A step applies it to every iterate before f sees it, so f never sees
# a frozen part move, not even in the middle of a step (the reversible y).
Hold = Callable[[Tensor, Tensor], Tensor]


def _held(hold: Hold | None, new: Tensor, old: Tensor) -> Tensor:
    return new if hold is None else hold(new, old)


class Solver:
    """A fixed-point solver: `init(problem, z0)` then repeated `step(problem, state, hold)`.

    `state_dtype` is the dtype of the iterates and update arithmetic (None: the dtype of z0). `hold` (None
    unless groups are frozen) keeps frozen parts of each iterate at their old values before f is evaluated."""

    state_dtype: torch.dtype | None = None

    def init(self, problem: Problem, z0: Tensor) -> IterateState:
        return IterateState(z=z0, fz=problem.evaluate(z0))

    def step(self, problem: Problem, state: IterateState,
             hold: Hold | None = None) -> IterateState:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Picard(Solver):
    """`z <- f(z)`. Converges when f is a contraction."""

    state_dtype: torch.dtype | None = None

    def step(self, problem: Problem, state: IterateState, hold: Hold | None = None) -> IterateState:
        z = _held(hold, state.fz, state.z)
        return IterateState(z=z, fz=problem.evaluate(z))


@dataclass(frozen=True)
class Relaxed(Solver):
    """`z <- (1 - beta) z + beta f(z)`: damped Picard, beta in (0, 2)."""

    beta: float = 0.5
    state_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _check_beta(self.beta, "Relaxed"))

    def step(self, problem: Problem, state: IterateState, hold: Hold | None = None) -> IterateState:
        with problem.arithmetic():
            z = _held(hold, (1 - self.beta) * state.z + self.beta * state.fz, state.z)
        return IterateState(z=z, fz=problem.evaluate(z))


@dataclass
class AndersonState(IterateState):
    history_z: list[Tensor] = field(default_factory=list)
    history_fz: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration with memory `m` and mixing `beta`.

    The mixing weights solve the regularised least-squares problem
    `min_a ||sum_i a_i (f(z_i) - z_i)||^2 + lam * s * ||a||^2` subject to `sum_i a_i = 1` (per sample,
    s = mean squared residual norm, floored so it stays positive when every residual is zero). The
    regularisation makes the bordered system nonsingular in exact arithmetic, also when the residuals
    are linearly dependent or all zero; the pseudo-inverse is a fallback for a system that rounding
    leaves singular. That small system is solved in float32 or wider whatever the state dtype
    (torch has no float16/bfloat16 LU); the weights are cast back to the state dtype for the mixing.
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4
    state_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError(f"Anderson: memory m must be >= 1, got {self.m}")
        object.__setattr__(self, "beta", _check_beta(self.beta, "Anderson"))

    def init(self, problem: Problem, z0: Tensor) -> AndersonState:
        return AndersonState(z=z0, fz=problem.evaluate(z0))

    def step(self, problem: Problem, state: AndersonState, hold: Hold | None = None) -> AndersonState:
        # Lists, not in-place buffers, so autograd can run through the mixing (UnrolledAdjoint).
        hz = (state.history_z + [state.z])[-self.m :]
        hf = (state.history_fz + [state.fz])[-self.m :]
        with problem.arithmetic():
            if len(hz) == 1:
                z = (1 - self.beta) * state.z + self.beta * state.fz
            else:
                X, F = torch.stack(hz, dim=1), torch.stack(hf, dim=1)  # [B, n, D]
                alpha = self._weights(F - X).to(X.dtype)  # [B, n]
                mix_f = torch.einsum("bn,bnd->bd", alpha, F)
                mix_z = torch.einsum("bn,bnd->bd", alpha, X)
                z = self.beta * mix_f + (1 - self.beta) * mix_z
            z = _held(hold, z, state.z)
        return AndersonState(z=z, fz=problem.evaluate(z), history_z=hz, history_fz=hf)

    def _weights(self, G: Tensor) -> Tensor:
        """Mixing weights [B, n] summing to 1 per sample, for residuals G [B, n, D]; float32 for half G."""
        B, n, _ = G.shape
        # Half-precision states: the Gram matrix and the solve run in float32 (no half LU in torch, and
        # a 1e-4 regulariser is below bfloat16's resolution anyway).
        G = G.to(torch.promote_types(G.dtype, torch.float32))
        GG = G @ G.transpose(1, 2)  # [B, n, n]
        # Regularise relative to the residuals' own scale, so tiny residuals near convergence are not
        # swamped (an absolute lam would flatten the weights to uniform there).
        # The floor keeps lam * scale representable when every residual of a sample is exactly zero.
        scale = GG.diagonal(dim1=1, dim2=2).mean(dim=1).detach().clamp_min(torch.finfo(G.dtype).tiny ** 0.5)
        eye = torch.eye(n, dtype=G.dtype, device=G.device)
        H = torch.zeros(B, n + 1, n + 1, dtype=G.dtype, device=G.device)
        H[:, 0, 1:] = 1
        H[:, 1:, 0] = 1
        H[:, 1:, 1:] = GG + self.lam * scale[:, None, None] * eye
        rhs = torch.zeros(B, n + 1, 1, dtype=G.dtype, device=G.device)
        rhs[:, 0] = 1
        sol, info = torch.linalg.solve_ex(H, rhs)
        if bool((info != 0).any()) or not bool(torch.isfinite(sol).all()):
            sol = torch.linalg.pinv(H) @ rhs
        return sol[:, 1:, 0]


@dataclass
class BroydenState(IterateState):
    us: list[Tensor] = field(default_factory=list)
    vs: list[Tensor] = field(default_factory=list)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class Broyden(Solver):
    """Quasi-Newton root finding on `g(z) = f(z) - z` with Broyden's ("good") rank-one updates.

    The inverse Jacobian of g starts at `-I` (so the first step is a Picard step) and keeps the last
    `memory` rank-one updates `B = -I + sum_i u_i v_i^T`, per sample; None (the default) keeps them all,
    as torchdeq does, which costs 2 [B, D] tensors per step taken (so at most 2 * max_steps). Steps have
    unit length (no line search), as in the DEQ reference implementation.

    Why keep every update: `python benchmarks/broyden_memory.py` (steps to tolerance, max 200; "-" = not
    reached) found that dropping updates stalls or diverges on slow problems and buys nothing on fast ones:

        problem      tol    m=8       m=16      m=32        m=64       all
        linear-sym   1e-6   diverged  diverged  diverged    - (2e-2)   172
        linear-rot   1e-6   - (1.3)   - (0.9)   - (1.2)     - (0.7)    - (2e-4)
        tanh         1e-6   diverged  49        42          41         41
        tanh-hard    1e-6   diverged  diverged  - (5e93)    - (2e25)   78
        block-fwd    1e-4   17        18        18          18         18
        block-bwd    1e-5   6         6         6           6          6
    """

    memory: int | None = None
    state_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        m = self.memory
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"Broyden: memory must be an integer >= 1 or None (keep every update), got {m!r}")

    def init(self, problem: Problem, z0: Tensor) -> BroydenState:
        return BroydenState(z=z0, fz=problem.evaluate(z0))

    def _apply_inverse(self, us: list[Tensor], vs: list[Tensor], v: Tensor) -> Tensor:
        out = -v
        for u, w in zip(us, vs, strict=True):
            out = out + u * _dot(w, v)
        return out

    def _apply_inverse_t(self, us: list[Tensor], vs: list[Tensor], s: Tensor) -> Tensor:
        out = -s
        for u, w in zip(us, vs, strict=True):
            out = out + w * _dot(u, s)
        return out

    def step(self, problem: Problem, state: BroydenState, hold: Hold | None = None) -> BroydenState:
        with problem.arithmetic():
            g = state.fz - state.z
            dz = -self._apply_inverse(state.us, state.vs, g)
            if hold is not None:  # a frozen part does not move: its dz is 0 (the rank-one update skips it)
                dz = hold(dz, torch.zeros_like(dz))
            z = state.z + dz
        fz = problem.evaluate(z)
        with problem.arithmetic():
            dg = (fz - z) - g
            Bdg = self._apply_inverse(state.us, state.vs, dg)
            sB = self._apply_inverse_t(state.us, state.vs, dz)
            den = _dot(sB, dg)
            ok = den.abs() > 1e-12
            u = torch.where(ok, (dz - Bdg) / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(dz))
        us, vs = state.us + [u], state.vs + [sB]
        if self.memory is not None and len(us) > self.memory:
            us, vs = us[-self.memory :], vs[-self.memory :]
        return BroydenState(z=z, fz=fz, us=us, vs=vs)


@dataclass
class ReversibleState(IterateState):
    """The two coupled iterates of the reversible scheme: `y` and `z` (with `fz = f(z)`)."""

    y: Tensor = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Reversible(Solver):
    """The reversible two-state iteration (docs/DESIGN.md §1), from `y0 = z0`:

        y[n+1] = (1 - beta) * y[n] + beta * f(z[n])
        z[n+1] = (1 - beta) * z[n] + beta * f(y[n+1])

    Every step inverts algebraically, which is what `ReversibleAdjoint` exploits. `beta` in (0, 2),
    != 1. `state_dtype` (default float64) holds y, z and the update arithmetic, while f runs in the
    dtype of z0: the reversal divides by (1 - beta) every step, so rounding errors grow roughly like
    ((1 + beta * Lip(f)) / |1 - beta|)^N, and float64 states keep them negligible.
    """

    beta: float = 0.5
    state_dtype: torch.dtype | None = torch.float64

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _check_beta(self.beta, "Reversible"))
        object.__setattr__(self, "state_dtype", as_dtype(self.state_dtype))

    def init(self, problem: Problem, z0: Tensor) -> ReversibleState:
        return ReversibleState(z=z0, fz=problem.evaluate(z0), y=z0)

    def step(self, problem: Problem, state: ReversibleState, hold: Hold | None = None) -> ReversibleState:
        b = self.beta
        with problem.arithmetic():
            y = _held(hold, (1 - b) * state.y + b * state.fz, state.y)
        fy = problem.evaluate(y)
        with problem.arithmetic():
            z = _held(hold, (1 - b) * state.z + b * fy, state.z)
        return ReversibleState(z=z, fz=problem.evaluate(z), y=y)


def with_state_dtype(solver: Solver, dtype: torch.dtype | str | None) -> Solver:
    """A copy of `solver` whose iterates live in `dtype`."""
    return replace(solver, state_dtype=as_dtype(dtype))  # type: ignore[type-var]
