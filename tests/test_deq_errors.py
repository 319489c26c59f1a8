"""Bad input to the solver core gets a clear error."""

from __future__ import annotations

import math

import pytest
import torch

from revdeq_cli import deq


def _f(z, x):
    return torch.tanh(z + x)


Z0, X = torch.zeros(2, 3), torch.randn(2, 3)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, -0.5, 2.5, math.nan])
def test_reversible_beta_out_of_range(beta):
    with pytest.raises(ValueError, match="beta"):
        deq.Reversible(beta)


def test_relaxed_beta_one_is_allowed_but_not_two():
    deq.Relaxed(1.0)
    with pytest.raises(ValueError, match="beta"):
        deq.Relaxed(2.0)


@pytest.mark.parametrize("max_steps", [0, -1, 2.5])
def test_max_steps_must_be_positive_int(max_steps):
    with pytest.raises(ValueError, match="max_steps"):
        deq.solve(_f, Z0, X, solver=deq.Picard(), max_steps=max_steps)


@pytest.mark.parametrize("tol", [0.0, -1e-3, math.inf, math.nan])
def test_tol_must_be_positive(tol):
    with pytest.raises(ValueError, match="tol"):
        deq.solve(_f, Z0, X, solver=deq.Picard(), tol=tol)


@pytest.mark.parametrize("solver", [deq.Picard(), deq.Relaxed(0.5), deq.Anderson(), deq.Broyden()])
def test_reversible_adjoint_needs_reversible_solver(solver):
    with pytest.raises(ValueError, match="Reversible solver"):
        deq.solve(_f, Z0, X, solver=solver, adjoint=deq.ReversibleAdjoint())


def test_f_returning_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(2, 3\)"):
        deq.solve(lambda z, x: torch.zeros(2, 4), Z0, X, solver=deq.Reversible(0.5))


def test_f_returning_wrong_structure():
    with pytest.raises(ValueError, match="tuple of 2 Tensors"):
        deq.solve(lambda z, x: z[0], (Z0, Z0), X, solver=deq.Picard())
    with pytest.raises(ValueError, match="expected a Tensor"):
        deq.solve(lambda z, x: (z, z), Z0, X, solver=deq.Picard())


def test_non_finite_residual_names_the_step():
    calls = {"n": 0}

    def blows_up(z, x):
        calls["n"] += 1
        return z * 0 + (math.inf if calls["n"] >= 4 else 1.0)

    # Reversible: evaluations 1 (z0), 2-3 (step 1), 4-5 (step 2): inf appears in step 2.
    with pytest.raises(deq.SolverDivergedError, match="step 2") as info:
        deq.solve(blows_up, Z0, X, solver=deq.Reversible(0.5), tol=None, max_steps=5)
    assert info.value.step == 2


def test_unknown_names_in_factories():
    with pytest.raises(ValueError, match="unknown solver"):
        deq.make_solver("newton")
    with pytest.raises(ValueError, match="unknown gradient method"):
        deq.make_adjoint("magic")
    assert isinstance(deq.make_solver("reversible", beta=0.8, state_dtype="float32"), deq.Reversible)


def test_anderson_all_zero_residuals_give_finite_weights():
    weights = deq.Anderson()._weights(torch.zeros(3, 2, 8))
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))


def test_backward_divergence_names_the_backward_solve_and_its_remedies():
    # f(z) = x + s z with a huge s: the forward step is finite, but the implicit backward solve
    # u = J^T u + g = s u + g overflows within a few steps.
    x = torch.randn(2, 3, requires_grad=True)
    sol = deq.solve(lambda z, x_: x_ + 1e30 * z, Z0, x, solver=deq.Picard(), tol=None, max_steps=1,
                    adjoint=deq.ImplicitAdjoint(tol=1e-6, max_steps=50, solver=deq.Picard()))
    with pytest.raises(deq.SolverDivergedError) as info:
        sol.z.sum().backward()
    err = info.value
    assert err.where == "backward" and err.step < 50
    message = str(err)
    assert "backward (implicit-gradient) solver step" in message and "forward" not in message.split(":")[0]
    assert "implicit_max_steps" in message and "phantom" in message and "reversible" in message
    assert "smaller beta" not in message  # beta does not enter the backward solve


def test_forward_divergence_says_forward():
    def blows_up(z, x):
        return z * 0 + math.inf

    with pytest.raises(deq.SolverDivergedError, match="forward solver step 1") as info:
        deq.solve(blows_up, Z0, X, solver=deq.Picard(), tol=None, max_steps=3)
    assert info.value.where == "forward"


@pytest.mark.parametrize("memory", [0, -1, 2.5, True])
def test_broyden_memory_must_be_a_positive_int_or_none(memory):
    with pytest.raises(ValueError, match="memory"):
        deq.Broyden(memory=memory)


def test_keep_best_is_refused_for_the_reversible_solver():
    for adjoint in (None, deq.UnrolledAdjoint(), deq.ImplicitAdjoint()):
        with pytest.raises(ValueError, match="keep_best is not available for the Reversible solver"):
            deq.solve(_f, Z0, X, solver=deq.Reversible(0.5), adjoint=adjoint, keep_best=True)


def test_forward_divergence_suggests_only_what_would_change_something():
    def blows_up(z, x):
        return z * 0 + math.inf

    with pytest.raises(deq.SolverDivergedError) as info:  # float64 states already, beta 0.5
        deq.solve(blows_up, Z0, X, solver=deq.Reversible(0.5), tol=None, max_steps=3)
    assert "float64" not in str(info.value) and "smaller beta (now 0.5)" in str(info.value)
    with pytest.raises(deq.SolverDivergedError) as info:  # float32 states, no beta
        deq.solve(blows_up, Z0, X, solver=deq.Picard(), tol=None, max_steps=3)
    assert "float64 solver states" in str(info.value) and "beta <" in str(info.value)
    assert "smaller beta" not in str(info.value)
