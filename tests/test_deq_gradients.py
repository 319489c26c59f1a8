"""Exactness of the reversible backward pass, and the approximate baselines against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revdeq_cli import deq


@pytest.fixture(autouse=True)
def _float64_default():
    """Exactness is checked in float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class MLPBlock(nn.Module):
    """f(z, x) = 0.7 * tanh(W2 tanh(W1 z + U x)): a contraction-ish MLP."""

    def __init__(self, width: int = 6, hidden: int = 12, scale: float = 0.7):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.u = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width)
        self.scale = scale

    def forward(self, z, x):
        return self.scale * torch.tanh(self.w2(torch.tanh(self.w1(z) + self.u(x))))


class TupleBlock(nn.Module):
    """A two-part state (a, b) of different shapes, coupled both ways.

    Strongly contractive on purpose: for beta > 1 the reversal amplifies float64 rounding by roughly
    (1 + beta * Lip(f)) / |1 - beta| per step (docs/DESIGN.md §1), and 1e-10 must hold at beta = 1.3 too."""

    def __init__(self):
        super().__init__()
        self.a_from_b = nn.Linear(3, 4)
        self.b_from_a = nn.Linear(4, 3)
        self.mix = nn.Linear(4, 4)

    def forward(self, z, x):
        a, b = z
        a_new = 0.3 * torch.tanh(self.mix(a) + self.a_from_b(b) + x)
        b_new = 0.3 * torch.sin(self.b_from_a(a)) + 0.1 * b
        return a_new, b_new


def _grads(f, z0, x, adjoint, beta, tol, max_steps):
    sol = deq.solve(f, z0, x, solver=deq.Reversible(beta), adjoint=adjoint, tol=tol, max_steps=max_steps)
    parts = sol.z if isinstance(sol.z, tuple) else (sol.z,)
    loss = sum((p**3).sum() + p.sum() for p in parts)  # a non-trivial cotangent
    z0_parts = z0 if isinstance(z0, tuple) else (z0,)
    grads = torch.autograd.grad(loss, [*z0_parts, x, *f.parameters()])
    return sol, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3])
def test_reversible_equals_unrolled_mlp(beta):
    torch.manual_seed(0)
    f = MLPBlock()
    z0 = torch.randn(5, 6, requires_grad=True)
    x = torch.randn(5, 6, requires_grad=True)
    max_steps = 40
    ref_sol, ref = _grads(f, z0, x, deq.UnrolledAdjoint(), beta, 1e-3, max_steps)
    rev_sol, rev = _grads(f, z0, x, deq.ReversibleAdjoint(), beta, 1e-3, max_steps)
    assert 1 < rev_sol.steps < max_steps, "early stopping must be active in this test"
    assert rev_sol.steps == ref_sol.steps
    assert rev_sol.backward.nfe == 2 * rev_sol.steps  # the steps taken are the steps reversed
    assert rev_sol.nfe == 1 + 2 * rev_sol.steps
    for name, g_rev, g_ref in zip(["z0", "x", *dict(f.named_parameters())], rev, ref, strict=True):
        assert _rel(g_rev, g_ref) <= 1e-10, name
    assert rev_sol.backward.reconstruction_error < 1e-8


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.3])
def test_reversible_equals_unrolled_tuple_state(beta):
    torch.manual_seed(1)
    f = TupleBlock()
    z0 = (torch.randn(3, 4, requires_grad=True), torch.randn(3, 3, requires_grad=True))
    x = torch.randn(3, 4, requires_grad=True)
    max_steps = 40
    ref_sol, ref = _grads(f, z0, x, deq.UnrolledAdjoint(), beta, 1e-3, max_steps)
    rev_sol, rev = _grads(f, z0, x, deq.ReversibleAdjoint(), beta, 1e-3, max_steps)
    assert 1 < rev_sol.steps < max_steps
    assert isinstance(rev_sol.z, tuple) and rev_sol.z[1].shape == (3, 3)
    for g_rev, g_ref in zip(rev, ref, strict=True):
        assert _rel(g_rev, g_ref) <= 1e-10


def test_gradcheck_reversible():
    torch.manual_seed(2)
    w = torch.randn(4, 4) * 0.3
    w.requires_grad_(True)

    def f(z, x):
        return torch.tanh(z @ w + x)

    def run(z0, x, w_):
        return deq.solve(
            f, z0, x, solver=deq.Reversible(0.6), adjoint=deq.ReversibleAdjoint(), tol=None, max_steps=5, params=[w_]
        ).z

    z0 = torch.randn(2, 4, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    assert torch.autograd.gradcheck(run, (z0, x, w), eps=1e-6, atol=1e-8)


def test_implicit_matches_unrolled_at_convergence():
    torch.manual_seed(3)
    f = MLPBlock(scale=0.5)
    x = torch.randn(4, 6, requires_grad=True)
    z0 = torch.zeros(4, 6)

    def grads(adjoint):
        sol = deq.solve(f, z0, x, solver=deq.Relaxed(0.9), adjoint=adjoint, tol=1e-12, max_steps=300)
        assert sol.max_residual < 1e-11
        loss = (sol.z**2).sum() + sol.z.sum()
        return torch.autograd.grad(loss, [x, *f.parameters()])

    ref = grads(deq.UnrolledAdjoint())
    imp = grads(deq.ImplicitAdjoint(tol=1e-12, max_steps=200))
    for g_imp, g_ref in zip(imp, ref, strict=True):
        assert _rel(g_imp, g_ref) <= 1e-5


def test_phantom_one_step_is_jacobian_free():
    torch.manual_seed(4)
    f = MLPBlock(scale=0.5)
    x = torch.randn(3, 6, requires_grad=True)
    z0 = torch.zeros(3, 6)
    sol = deq.solve(f, z0, x, solver=deq.Picard(), adjoint=deq.PhantomAdjoint(steps=1), tol=1e-10, max_steps=200)
    (gx,) = torch.autograd.grad(sol.z.sum(), [x])
    z_star = deq.solve(f, z0, x.detach(), solver=deq.Picard(), tol=1e-10, max_steps=200).z.detach()
    (gx_jfb,) = torch.autograd.grad(f(z_star, x).sum(), [x])
    assert torch.allclose(gx, gx_jfb, atol=1e-12)
    assert sol.backward.nfe == 1


@pytest.mark.parametrize("solver", [deq.Picard(), deq.Relaxed(0.7), deq.Anderson(m=4), deq.Broyden()])
def test_baseline_solvers_converge_and_unroll(solver):
    torch.manual_seed(5)
    f = MLPBlock(scale=0.5)
    x = torch.randn(4, 6, requires_grad=True)
    sol = deq.solve(f, torch.zeros(4, 6), x, solver=solver, adjoint=deq.UnrolledAdjoint(), tol=1e-8, max_steps=100)
    assert sol.max_residual < 1e-8
    assert sol.nfe == 1 + sol.steps
    assert torch.allclose(sol.z, f(sol.z, x), atol=1e-6)
    sol.z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_anderson_and_broyden_beat_picard_on_a_slow_contraction():
    torch.manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    a = q @ torch.diag(torch.linspace(0.5, 0.95, 6)) @ q.T  # spectral radius 0.95: Picard is slow

    def f(z, x):
        return z @ a.T + x

    x = torch.randn(4, 6)
    steps = {
        type(s).__name__: deq.solve(f, torch.zeros(4, 6), x, solver=s, tol=1e-8, max_steps=1000).steps
        for s in (deq.Picard(), deq.Anderson(m=6), deq.Broyden())
    }
    assert steps["Picard"] > 200
    assert steps["Anderson"] < steps["Picard"] / 5 and steps["Broyden"] < 20, steps


def test_anderson_singular_system_does_not_crash():
    # f constant: after one step every residual is zero; the unregularised least-squares system would be
    # singular (the scale floor keeps the regularised one solvable).
    const = torch.randn(2, 5)
    sol = deq.solve(lambda z, x: const, torch.zeros(2, 5), None, solver=deq.Anderson(m=3), tol=None, max_steps=6)
    assert torch.allclose(sol.z, const)


def test_float32_compute_float64_states_and_autocast():
    torch.manual_seed(7)
    f = MLPBlock().float()
    x = torch.randn(3, 6, dtype=torch.float32, requires_grad=True)
    z0 = torch.zeros(3, 6, dtype=torch.float32)
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, z, x_):
            seen.append(z.dtype)
            return self.f(z, x_)

    spy = Spy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = deq.solve(spy, z0, x, solver=deq.Reversible(0.5), adjoint=deq.ReversibleAdjoint(), tol=None, max_steps=3)
    assert sol.z.dtype == torch.float32
    assert set(seen) == {torch.float32}  # f sees its compute dtype, never the float64 states
    sol.z.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_no_grad_records_nothing():
    f = MLPBlock()
    x = torch.randn(2, 6, requires_grad=True)
    with torch.no_grad():
        sol = deq.solve(f, torch.zeros(2, 6), x, solver=deq.Reversible(0.5), tol=1e-3, max_steps=5)
    assert not sol.z.requires_grad and sol.z.grad_fn is None


def test_solution_fields():
    f = MLPBlock()
    sol = deq.solve(f, torch.zeros(3, 6), torch.randn(3, 6), solver=deq.Reversible(0.5), tol=None, max_steps=4)
    assert sol.steps == 4 and len(sol.trace) == 4 and sol.nfe == 9
    assert sol.residual.shape == (3,) and sol.residual.dtype == torch.float64
    assert sol.max_residual == pytest.approx(sol.trace[-1])


def test_trace_off_computes_the_final_residual_only_and_changes_nothing_else():
    f = MLPBlock()
    x = torch.randn(3, 6)
    full = deq.solve(f, torch.zeros(3, 6), x, solver=deq.Reversible(0.5), tol=None, max_steps=4)
    lean = deq.solve(f, torch.zeros(3, 6), x, solver=deq.Reversible(0.5), tol=None, max_steps=4, trace=False)
    assert lean.steps == 4 and lean.nfe == 9 and lean.trace == full.trace[-1:]
    assert torch.equal(lean.z, full.z) and torch.equal(lean.residual, full.residual)
    # with a tolerance the residual is needed every step anyway: the trace is complete
    early = deq.solve(f, torch.zeros(3, 6), x, solver=deq.Reversible(0.5), tol=1e-2, max_steps=50, trace=False)
    assert len(early.trace) == early.steps > 1


def test_closure_parameters_are_refused_not_silently_dropped():
    # The earlier port's bug: a reversible backward that silently gave parameters no gradient.
    w = torch.randn(4, 4, requires_grad=True)
    sol = deq.solve(lambda z, x: torch.tanh(z @ w + x), torch.zeros(2, 4), torch.randn(2, 4, requires_grad=True),
                    solver=deq.Reversible(0.5), adjoint=deq.ReversibleAdjoint(), tol=None, max_steps=3)
    with pytest.raises(ValueError, match="params"):
        sol.z.sum().backward()


def test_reconstruction_error_exposes_low_precision_states():
    """Rounding growth in the reversal is reported, not silent: float32 states at beta = 1.3 rebuild z0
    far less accurately than float64 states."""
    torch.manual_seed(8)
    f = MLPBlock(scale=0.9)
    x = torch.randn(4, 6)
    errors = {}
    for dtype in (torch.float64, torch.float32):
        z0 = torch.randn(4, 6, requires_grad=True)
        solver = deq.Reversible(1.3, state_dtype=dtype)
        sol = deq.solve(f, z0, x, solver=solver, adjoint=deq.ReversibleAdjoint(), tol=None, max_steps=12)
        sol.z.sum().backward()
        errors[dtype] = sol.backward.reconstruction_error
    assert errors[torch.float64] < 1e-6
    assert errors[torch.float32] > 1e3 * errors[torch.float64]


@pytest.mark.parametrize("backward", [False, True])
def test_reversible_solve_leaves_no_tensor_for_the_cycle_collector(backward):
    """The output's graph must not hold the output itself (a reference cycle): dropping a result must free its
    solver states by reference counting, not when Python's cycle collector next runs (RSS grew over training)."""
    import gc

    torch.manual_seed(0)
    block = torch.nn.Linear(7, 7)
    x = torch.randn(5, 7, requires_grad=True)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable goes to gc.garbage, not freed
    try:
        sol = deq.solve(lambda z, x: torch.tanh(block(z)) + x, torch.zeros_like(x), x, solver=deq.Reversible(0.5),
                        adjoint=deq.ReversibleAdjoint(), tol=None, max_steps=3, params=list(block.parameters()))
        if backward:
            sol.z.sum().backward()
        del sol
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
        assert not cyclic, [tuple(t.shape) for t in cyclic]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("adjoint", [deq.ImplicitAdjoint(), deq.PhantomAdjoint(), deq.UnrolledAdjoint(),
                                     deq.ReversibleAdjoint()], ids=lambda a: type(a).__name__)
def test_no_graph_outlives_its_backward(adjoint):
    """Every evaluation of f is freed once the solution is: a gradient method that left a reference cycle
    through autograd (a hook whose closure holds the tensor it hooks) kept each step's graph alive, and a long
    training run ran out of memory."""
    import gc
    import weakref

    outputs = []

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, z, x):
            out = torch.tanh(self.lin(z)) * 0.5 + x
            outputs.append(weakref.ref(out))
            return out

    f, x = F().double(), torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    solver = deq.Reversible(beta=0.5) if isinstance(adjoint, deq.ReversibleAdjoint) else deq.Anderson()
    sol = deq.solve(f, torch.zeros(4, 8, dtype=torch.float64), x, solver=solver, adjoint=adjoint, tol=1e-8,
                    max_steps=12)
    sol.z.sum().backward()
    del sol
    gc.collect()
    assert outputs and [r for r in outputs if r() is not None] == []
