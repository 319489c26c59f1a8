"""Solver edge cases: keep_best on solves that do not converge, the residual of what is returned, half-precision
states, Broyden's memory."""

from __future__ import annotations

import pytest
import torch

from revdeq_cli import deq
from revdeq_cli.deq.state import relative_residual

D = 16


@pytest.fixture(autouse=True)
def _float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _hard_problem():
    """f(z) = tanh(W z + U x) with ||W|| ~ 12: no solver below converges in 30 steps, and residuals go up and
    down along the way. W and U are parameters (they get gradients); x is the input."""
    g = torch.Generator().manual_seed(0)
    w = (6.0 * torch.randn(D, D, generator=g) / D**0.5).requires_grad_()
    u = (0.3 * torch.randn(D, D, generator=g)).requires_grad_()
    x = torch.randn(4, D, generator=g).requires_grad_()

    def f(z, x_):
        return torch.tanh(z @ w.T + x_ @ u.T)

    return f, x, [w, u]


SOLVERS = [deq.Picard(), deq.Relaxed(0.7), deq.Anderson(m=5), deq.Broyden(memory=4)]


def _residual_trace(f, x, params, solver, steps):
    """[steps, B]: each sample's residual after step k = 1..steps (solves are deterministic)."""
    with torch.no_grad():
        return torch.stack([deq.solve(f, torch.zeros(4, D), x, solver=solver, tol=None, max_steps=k,
                                      params=params).residual for k in range(1, steps + 1)])


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_keep_best_returns_each_samples_lowest_residual_iterate(solver):
    f, x, params = _hard_problem()
    steps = 30
    trace = _residual_trace(f, x, params, solver, steps)
    with torch.no_grad():
        last = deq.solve(f, torch.zeros(4, D), x, solver=solver, tol=None, max_steps=steps, params=params)
        best = deq.solve(f, torch.zeros(4, D), x, solver=solver, tol=None, max_steps=steps, params=params,
                         keep_best=True)
    assert float(last.residual.max()) > 1e-3, "the problem must not converge"
    assert torch.equal(last.residual, trace[-1])
    assert torch.equal(best.residual, trace.min(dim=0).values)  # per sample, over steps 1..N
    assert bool((best.residual < last.residual).any())  # it changes something on this problem
    assert best.steps == last.steps == steps and best.trace == last.trace
    # the residual is that of the returned z
    torch.testing.assert_close(best.residual, relative_residual(best.z, f(best.z, x)), rtol=1e-12, atol=0)


def test_keep_best_stops_at_tol_like_the_last_iterate_does():
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    for solver in SOLVERS:
        last, best = (deq.solve(lambda z, x_: 0.5 * torch.tanh(z + x_), torch.zeros(4, D), x, solver=solver, tol=1e-8,
                                max_steps=200, keep_best=keep) for keep in (False, True))
        assert best.steps == last.steps < 200 and float(best.residual.max()) < 1e-8


def test_keep_best_with_unrolled_gradient_is_the_gradient_of_the_returned_iterates():
    """Backprop through the per-sample selection: sample b's gradient is that of the iterate at its best step."""
    f, x, params = _hard_problem()
    solver, steps = deq.Anderson(m=5), 30
    best_step = _residual_trace(f, x, params, solver, steps).argmin(dim=0) + 1  # first minimum, like keep_best
    assert len(set(best_step.tolist())) > 1 and int(best_step.min()) < steps  # rows from different steps
    cot = torch.randn(4, D, generator=torch.Generator().manual_seed(1))

    sol = deq.solve(f, torch.zeros(4, D), x, solver=solver, adjoint=deq.UnrolledAdjoint(), tol=None,
                    max_steps=steps, params=params, keep_best=True)
    got = torch.autograd.grad((sol.z * cot).sum(), [x, *params])

    want = [torch.zeros_like(t) for t in (x, *params)]
    for b, k in enumerate(best_step.tolist()):
        z_k = deq.solve(f, torch.zeros(4, D), x, solver=solver, adjoint=deq.UnrolledAdjoint(), tol=None,
                        max_steps=k, params=params).z
        torch.testing.assert_close(sol.z[b], z_k[b], rtol=0, atol=0)
        for acc, g in zip(want, torch.autograd.grad((z_k[b] * cot[b]).sum(), [x, *params]), strict=True):
            acc += g
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adjoint", [deq.ImplicitAdjoint(tol=1e-8, max_steps=100), deq.PhantomAdjoint(steps=2)],
                         ids=["implicit", "phantom"])
def test_keep_best_with_implicit_and_phantom_restarts_from_the_best_point(adjoint):
    f, x, params = _hard_problem()
    solver = deq.Anderson(m=5)
    with torch.no_grad():
        best = deq.solve(f, torch.zeros(4, D), x, solver=solver, tol=None, max_steps=30, params=params,
                         keep_best=True)
    sol = deq.solve(f, torch.zeros(4, D), x, solver=solver, adjoint=adjoint, tol=None, max_steps=30,
                    params=params, keep_best=True)
    assert torch.equal(sol.z.detach(), best.z) and torch.equal(sol.residual, best.residual)
    sol.z.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


ADJOINTS = {
    "unrolled": deq.UnrolledAdjoint(),
    "implicit": deq.ImplicitAdjoint(tol=1e-8, max_steps=100),
    "phantom": deq.PhantomAdjoint(steps=2, beta=0.5),
}


@pytest.mark.parametrize("name", list(ADJOINTS))
@pytest.mark.parametrize("keep_best", [False, True])
def test_residual_is_that_of_the_returned_z(name, keep_best):
    """Solution.residual describes sol.z under every gradient method (ImplicitAdjoint used to return f(z_N) while
    reporting z_N's residual), with autograd on and off."""
    f, x, params = _hard_problem()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            sol = deq.solve(f, torch.zeros(4, D), x, solver=deq.Anderson(m=5), adjoint=ADJOINTS[name], tol=None,
                            max_steps=12, params=params, keep_best=keep_best)
        assert sol.z.requires_grad == grad
        with torch.no_grad():
            actual = relative_residual(sol.z, f(sol.z, x))
        assert float(actual.max()) > 1e-3  # not converged: z_N and f(z_N) differ
        torch.testing.assert_close(sol.residual, actual, rtol=1e-12, atol=0)


def test_residual_is_that_of_the_returned_z_for_the_reversible_solver():
    f, x, params = _hard_problem()
    sol = deq.solve(f, torch.zeros(4, D), x, solver=deq.Reversible(0.5), tol=None, max_steps=6, params=params)
    with torch.no_grad():
        torch.testing.assert_close(sol.residual, relative_residual(sol.z, f(sol.z, x)), rtol=1e-12, atol=0)


def test_implicit_gradient_is_unchanged_by_returning_z_star():
    """The returned value is z*, the gradient still the implicit one: at a converged solve it matches unrolled."""
    g = torch.Generator().manual_seed(3)
    w = (0.5 * torch.randn(D, D, generator=g) / D**0.5).requires_grad_()
    x = torch.randn(3, D, generator=g).requires_grad_()

    def f(z, x_):
        return torch.tanh(z @ w.T + x_)

    def grads(adjoint):
        sol = deq.solve(f, torch.zeros(3, D), x, solver=deq.Anderson(m=5), adjoint=adjoint, tol=1e-12,
                        max_steps=200, params=[w])
        return torch.autograd.grad((sol.z**2).sum(), [x, w])

    for g_imp, g_ref in zip(grads(deq.ImplicitAdjoint(tol=1e-12, max_steps=200)), grads(deq.UnrolledAdjoint()),
                            strict=True):
        torch.testing.assert_close(g_imp, g_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_anderson_with_half_precision_states_on_cpu(dtype):
    g = torch.Generator().manual_seed(4)
    w = 0.5 * torch.randn(D, D, generator=g, dtype=torch.float32) / D**0.5

    def f(z, x_):
        return torch.tanh(z @ w.to(z.dtype).T + x_)

    x = torch.randn(3, D, generator=g).to(dtype)
    sol = deq.solve(f, torch.zeros(3, D, dtype=dtype), x, solver=deq.Anderson(m=5), tol=2e-2, max_steps=30)
    assert sol.z.dtype == dtype and torch.isfinite(sol.z).all()
    assert sol.max_residual < 2e-2 and sol.steps < 30
    # the mixing system is solved in float32; its weights still sum to 1
    weights = deq.Anderson()._weights(torch.randn(3, 4, D, generator=g).to(dtype))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, dtype=torch.float32))
    # and as ImplicitAdjoint's default backward solver, with half-precision gradients
    xg = x.clone().requires_grad_()
    sol = deq.solve(f, torch.zeros(3, D, dtype=dtype), xg, solver=deq.Anderson(m=5), tol=2e-2, max_steps=30,
                    adjoint=deq.ImplicitAdjoint(tol=1e-2, max_steps=20))
    sol.z.float().sum().backward()
    assert xg.grad is not None and xg.grad.dtype == dtype and torch.isfinite(xg.grad).all()


def test_broyden_keeps_every_update_by_default():
    """The default memory was chosen with benchmarks/broyden_memory.py (table in Broyden's docstring): on slow
    problems a bounded memory stalls or diverges where keeping every update (torchdeq's choice) converges."""
    assert deq.Broyden().memory is None
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(5)))
    a = q @ torch.diag(torch.linspace(0.5, 0.995, 64)) @ q.T
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))

    def f(z, x_):
        return z @ a.T + x_

    def solve(solver):
        return deq.solve(f, torch.zeros(2, 64), x, solver=solver, tol=1e-8, max_steps=150)

    full = solve(deq.Broyden())
    assert full.max_residual < 1e-8, full.max_residual
    bounded = solve(deq.Broyden(memory=8))
    assert bounded.steps > full.steps
