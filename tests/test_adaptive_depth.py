"""Adaptive depth: every position stops iterating at its own tolerance, and the exact cache reproduces it.

The rule (deq/iteration.py, docs/DESIGN.md §7): after each solver step a position whose relative residual is
below `inference_tol` freezes (its states stop changing, f still sees them); the solve ends when all have.
"""

from __future__ import annotations

import pytest
import torch
from test_model_lm import _one_thread  # noqa: F401  (autouse fixture: one torch thread)

from revdeq_cli import deq
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.training.generation import generate_sample

VOCAB = 40


def _elementwise(scale: torch.Tensor):
    """f(z, x) = tanh(scale * z) * 0.9 + x: each element its own contraction (rate `scale` [D])."""
    return lambda z, x: 0.9 * torch.tanh(scale * z) + x


@pytest.mark.parametrize("solver", ["reversible", "picard", "relaxed"])
def test_each_group_freezes_at_its_own_tolerance_as_if_solved_alone(solver):
    """With an f that does not couple groups, each group's result and step count equal solving it alone
    with a batch-wide tol: nothing of the other groups leaks in, and a group stops at its own residual."""
    torch.manual_seed(0)
    groups, width = 4, 3
    scale = torch.tensor([0.1, 0.4, 0.7, 0.95]).repeat_interleave(width).double()  # slow to fast by group
    x = torch.randn(2, groups * width, dtype=torch.float64)
    f = _elementwise(scale)
    make = lambda: deq.make_solver(solver, beta=0.6)  # noqa: E731
    sol = deq.solve(f, torch.zeros_like(x), x, solver=make(), tol=1e-6, max_steps=200, groups=groups)
    assert sol.group_steps.shape == (2, groups)
    assert len(set(sol.group_steps.flatten().tolist())) > 1  # the groups did stop at different steps
    for b in range(2):
        for g in range(groups):
            part = slice(g * width, (g + 1) * width)
            alone = deq.solve(_elementwise(scale[part]), torch.zeros(1, width, dtype=torch.float64), x[b:b + 1, part],
                              solver=make(), tol=1e-6, max_steps=200)
            assert int(sol.group_steps[b, g]) == alone.steps
            torch.testing.assert_close(sol.z[b, part], alone.z[0], rtol=0, atol=1e-12)
    assert sol.steps == int(sol.group_steps.max())


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_solvers_that_mix_a_whole_sample_freeze_per_sample(solver):
    """Anderson and Broyden mix each sample's whole state, so groups=1 per sample: each sample stops alone."""
    x = torch.tensor([[0.5, -0.3], [0.1, 0.2]], dtype=torch.float64)
    sol = deq.solve(lambda z, x: 0.9 * torch.tanh(z * torch.tensor([[0.2], [0.95]]).double()) + x,
                    torch.zeros_like(x), x, solver=deq.make_solver(solver), tol=1e-8, max_steps=100, groups=1)
    for b in range(2):
        alone = deq.solve(lambda z, x, b=b: 0.9 * torch.tanh(z * (0.2, 0.95)[b]) + x, torch.zeros(1, 2).double(),
                          x[b:b + 1], solver=deq.make_solver(solver), tol=1e-8, max_steps=100)
        assert int(sol.group_steps[b, 0]) == alone.steps
        # (near convergence the mixing least squares is ill-conditioned: batched or not, it rounds apart)
        torch.testing.assert_close(sol.z[b], alone.z[0], rtol=0, atol=1e-6)
    assert sol.group_steps[0, 0] < sol.group_steps[1, 0]


def test_a_frozen_group_keeps_its_state_while_others_go_on_reading_it():
    """Group 1's f reads group 0's state. Group 0 freezes first; from then on group 1 iterates against
    group 0's frozen state, so its result is the fixed point of its own map given that frozen value."""
    def f(z, x):
        a, b = z[:, :2], z[:, 2:]
        return torch.cat([0.2 * torch.tanh(a) + x[:, :2], 0.97 * torch.tanh(b) + a.sum(1, keepdim=True) * 0.1], 1)

    x = torch.tensor([[0.3, -0.2, 0.0, 0.0]], dtype=torch.float64)
    sol = deq.solve(f, torch.zeros_like(x), x, solver=deq.Picard(), tol=1e-5, max_steps=500, groups=2)
    first, second = sol.group_steps[0].tolist()
    assert first < second
    frozen_a = deq.solve(lambda z, x: 0.2 * torch.tanh(z) + x, torch.zeros(1, 2).double(), x[:, :2],
                         solver=deq.Picard(), tol=1e-5, max_steps=500)
    torch.testing.assert_close(sol.z[:, :2], frozen_a.z, rtol=0, atol=0)  # exactly the state it froze at
    b = sol.z[:, 2:]
    residual = (b - (0.97 * torch.tanh(b) + frozen_a.z.sum(1, keepdim=True) * 0.1)).norm() / b.norm()
    assert residual < 1e-5


def test_inactive_groups_stay_at_z0_and_do_not_hold_the_solve_up():
    x = torch.randn(1, 6, dtype=torch.float64)
    f = _elementwise(torch.full((6,), 0.5, dtype=torch.float64))
    active = torch.tensor([[True, False, True]])
    z0 = torch.full_like(x, 7.0)
    sol = deq.solve(f, z0, x, solver=deq.Reversible(beta=0.5), tol=1e-6, max_steps=50, groups=3, active=active)
    assert sol.group_steps[0, 1] == 0 and sol.group_steps[0, 0] > 0
    assert torch.equal(sol.z[:, 2:4], z0[:, 2:4])
    assert sol.steps < 50


def test_per_group_stopping_is_inference_only_for_the_reversible_gradient_and_checks_its_arguments():
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    f = _elementwise(torch.full((4,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="inference"):
        deq.solve(f, torch.zeros(1, 4).double(), x, solver=deq.Reversible(), tol=1e-3, groups=2)
    with pytest.raises(ValueError, match="needs a tol"):
        deq.solve(f, torch.zeros(1, 4).double(), x.detach(), solver=deq.Picard(), tol=None, groups=2)
    with pytest.raises(ValueError, match="divides"):
        deq.solve(f, torch.zeros(1, 4).double(), x.detach(), solver=deq.Picard(), tol=1e-3, groups=3)
    # the unrolled gradient differentiates through the freezing: each group's gradient is that of its own
    # iteration cut at the step it froze
    x = torch.tensor([[0.1, 0.2, 3.0, -2.0]], dtype=torch.float64, requires_grad=True)
    sol = deq.solve(f, torch.zeros(1, 4).double(), x, solver=deq.Picard(), adjoint=deq.UnrolledAdjoint(), tol=1e-6,
                    max_steps=100, groups=2)
    (grad,) = torch.autograd.grad(sol.z.sum(), x)
    assert sol.group_steps[0, 0] != sol.group_steps[0, 1]
    for g in range(2):
        part = x.detach()[:, 2 * g:2 * g + 2].requires_grad_(True)
        alone = deq.solve(_elementwise(torch.full((2,), 0.5, dtype=torch.float64)), torch.zeros(1, 2).double(), part,
                          solver=deq.Picard(), adjoint=deq.UnrolledAdjoint(),
                          tol=None, max_steps=int(sol.group_steps[0, g]), params=[])
        (expected,) = torch.autograd.grad(alone.z.sum(), part)
        torch.testing.assert_close(grad[:, 2 * g:2 * g + 2], expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ the model


def _model(solver: str = "reversible", dtype: torch.dtype = torch.float64, tol: float = 1e-2, seed: int = 0,
           max_steps: int = 12) -> RevDEQForCausalLM:
    torch.manual_seed(seed)
    config = RevDEQConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=32, solver=solver, adjoint="reversible" if solver == "reversible"
                          else "unrolled", beta=0.5, init_state="input", block_skip="input", max_steps=2,
                          inference_max_steps=max_steps, inference_tol=tol)
    return RevDEQForCausalLM(config).to(dtype).eval()


def _ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("solver", ["reversible", "picard", "anderson"])
def test_cached_decoding_equals_full_recomputation_under_adaptive_depth(solver, dtype, atol):
    """A batch of two, the second row left-padded, a 3-token prompt, then one token at a time: the logits and
    every position's stopping step equal the full forward's."""
    model = _model(solver, dtype)
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        out = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
        logits, steps = [out.logits], [out.solver_position_steps]
        for t in range(3, 10):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits)
            steps.append(out.solver_position_steps)
    cached, cached_steps = torch.cat(logits, 1), torch.cat(steps, 1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full.logits[real], rtol=0, atol=atol)
    assert torch.equal(cached_steps, full.solver_position_steps)
    taken = full.solver_position_steps[real]
    assert int(taken.min()) < int(taken.max()) < model.config.inference_max_steps  # adaptive, and it converged
    assert int(full.solver_position_steps[1, :2].max()) == 0  # padding never iterates


def test_a_positions_result_does_not_depend_on_later_positions():
    """Under causal attention each position's trajectory, its stopping step included, depends only on the
    positions before it: every prefix's last position matches the full sequence there. (A batch-wide stop,
    the old inference_tol, fails this: the stop waited for the slowest position of the whole sequence.)"""
    model = _model()
    ids = _ids(1, 12)
    with torch.no_grad():
        full = model(ids)
        for t in (1, 4, 8):
            prefix = model(ids[:, :t])
            torch.testing.assert_close(prefix.logits[0, -1], full.logits[0, t - 1], rtol=0, atol=1e-10)
            assert int(prefix.solver_position_steps[0, -1]) == int(full.solver_position_steps[0, t - 1])


def test_padded_rows_match_their_unpadded_selves():
    model = _model()
    ids = _ids(1, 8)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        alone = model(ids)
        both = model(padded, attention_mask=mask)
    torch.testing.assert_close(both.logits[0, 3:], alone.logits[0], rtol=0, atol=1e-10)
    assert torch.equal(both.solver_position_steps[0, 3:], alone.solver_position_steps[0])


@pytest.mark.parametrize("cache_mode", ["exact", "fixed_point"])
def test_generate_with_and_without_the_cache_agree_under_adaptive_depth(cache_mode):
    model = _model(dtype=torch.float32)
    model.config.cache_mode = cache_mode
    prompt = _ids(2, 4)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    if cache_mode == "exact":
        assert torch.equal(cached, uncached)
    else:  # approximate (it reads only the final states), but it runs and stops per position too
        assert cached.shape == uncached.shape
    one = generate_sample(model, prompt[0].tolist(), max_new_tokens=8, temperature=0.0, use_cache=True)
    two = generate_sample(model, prompt[0].tolist(), max_new_tokens=8, temperature=0.0, use_cache=False)
    if cache_mode == "exact":
        assert one.token_ids == two.token_ids
        assert one.solver_steps_per_token == two.solver_steps_per_token < model.config.inference_max_steps
    assert 0 < one.max_solver_steps <= model.config.inference_max_steps


@pytest.mark.parametrize("cache_mode", ["exact", "fixed_point"])
def test_zero_inference_steps_decode_with_the_cache(cache_mode):
    """0 steps = z0 itself; the cached path used to fail inside deq.solve (max_steps must be >= 1)."""
    model = _model(dtype=torch.float32, tol=None, max_steps=0)
    model.config.cache_mode = cache_mode
    prompt = _ids(1, 4)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cache_refuses_a_changed_tolerance():
    model = _model()
    with torch.no_grad():
        out = model(_ids(1, 3), use_cache=True)
        model.config.inference_tol = 0.1
        with pytest.raises(ValueError, match="start a new cache"):
            model(_ids(1, 1), cache=out.cache, use_cache=True)
