"""The reversible pair's midpoint readout (`inference_readout: midpoint`, docs/DESIGN.md §1).

The reversible iteration is at rest wherever y = f(z) and z = f(y): at a fixed point of f, and on a 2-cycle of f.
Eval mode can read (y_N + z_N) / 2 instead of z_N; its residual is measured with one more evaluation of f, which an
exact cache keeps in a layer of its own.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_adaptive_depth import _ids, _model
from test_model_lm import _one_thread  # noqa: F401  (autouse fixture: one torch thread)

from revdeq_cli import deq
from revdeq_cli.deq.state import relative_residual
from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model.modeling import AttentionMask


def _two_cycle(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f(z) = x - 2 tanh(z): its fixed point z* (z* = x - 2 tanh z*) has f'(z*) < -1, so Picard runs away from it
    onto the 2-cycle (p, q) with q = f(p), p = f(q)."""
    return x - 2 * torch.tanh(z)


def test_the_reversible_pair_can_rest_on_a_two_cycle_whose_midpoint_is_the_fixed_point():
    """With x = 0 the cycle is (p, -p), p = 2 tanh p ~ 1.915, and the fixed point is 0: z's residual stays ~2 at
    any number of steps, while the midpoint is the fixed point (by symmetry, exactly)."""
    x = torch.zeros(1, 1, dtype=torch.float64)
    z0 = torch.full((1, 1), 0.3, dtype=torch.float64)
    for steps in (40, 80):
        sol = deq.solve(_two_cycle, z0, x, solver=deq.Reversible(beta=0.5), tol=None, max_steps=steps)
        y, z = float(sol.y), float(sol.z)
        assert abs(y + z) < 1e-9 and abs(abs(z) - 1.9150) < 1e-3  # at rest on the cycle, y = f(z), z = f(y)
        assert float(sol.residual) > 1.9  # ||z - f(z)|| / ||f(z)|| = ||z - y|| / ||y|| = 2
        assert abs((y + z) / 2) < 1e-9  # the midpoint: the fixed point 0


def test_the_solution_carries_the_pair_where_a_graph_allows():
    torch.manual_seed(0)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    f = lambda z, x: 0.5 * torch.tanh(z) + x  # noqa: E731
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    y, z = z0.clone(), z0.clone()
    for _ in range(5):  # the iteration by hand
        y = 0.5 * y + 0.5 * f(z, x)
        z = 0.5 * z + 0.5 * f(y, x)
    unrolled = deq.solve(f, z0, x, solver=deq.Reversible(), adjoint=deq.UnrolledAdjoint(), tol=None, max_steps=5)
    torch.testing.assert_close(unrolled.y, y, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(unrolled.y.sum(), x)  # y_N with its graph
    (g_hand,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, g_hand, rtol=1e-10, atol=0)
    with torch.no_grad():
        plain = deq.solve(f, z0, x, solver=deq.Reversible(), tol=None, max_steps=5)
    torch.testing.assert_close(plain.y, y.detach(), rtol=0, atol=1e-12)
    # the reversible backward starts from z_N's cotangent alone: no y to read under it
    assert deq.solve(f, z0, x, solver=deq.Reversible(), tol=None, max_steps=5).y is None
    assert deq.solve(f, z0, x, solver=deq.Picard(), tol=None, max_steps=5).y is None


def _midpoint_model(**kw) -> RevDEQForCausalLM:
    model = _model(**kw)
    model.config.inference_readout = "midpoint"
    return model


def test_eval_mode_reads_the_midpoint_and_reports_its_residual():
    """Logits = head(ln_f((y_N + z_N) / 2)) with y, z from the model's own iteration done by hand; the residual
    is that of the midpoint; one more evaluation of f; training mode still reads z_N."""
    model = _midpoint_model(tol=None, max_steps=6)
    ids = _ids(2, 9)
    with torch.no_grad():
        out = model(ids)
        x = model.wte(ids) + model.wpe(torch.arange(9)[None])
        mask = AttentionMask.build(0, 9, None, x.device)
        f = lambda s: model.blocks[0](s, x, mask)  # noqa: E731
        y = z = x
        for _ in range(6):
            y = 0.5 * y + 0.5 * f(z)
            z = 0.5 * z + 0.5 * f(y)
        m = (y + z) / 2
        torch.testing.assert_close(out.logits, model.lm_head(model.ln_f(m)), rtol=0, atol=1e-10)
        residual = float(relative_residual(m.flatten(1), f(m).flatten(1)).max())
        assert math.isclose(out.solver_residual, residual, rel_tol=1e-9)
        assert out.solver_nfe == 1 + 2 * 6 + 1
        assert not torch.allclose(m, z)  # the two readouts differ on this model: the test can tell them apart
        model.config.inference_readout = "z"
        torch.testing.assert_close(model(ids).logits, model.lm_head(model.ln_f(z)), rtol=0, atol=1e-10)
        model.config.inference_readout = "midpoint"
        model.train()
        trained = model(ids, solver_steps=6)
        model.eval()
    torch.testing.assert_close(trained.logits, model.lm_head(model.ln_f(z)), rtol=0, atol=1e-10)


def test_the_midpoints_gradient_in_eval_mode_is_exact():
    """Under autograd in eval mode the readout is differentiated (unrolled): the logits' vector-Jacobian product equals
    that of the same computation written out by hand (float64; the loss itself is float32, so not through it)."""
    model = _midpoint_model(tol=None, max_steps=4)
    ids = _ids(1, 7)
    params = list(model.blocks[0].parameters()) + [model.wte.weight]
    out = model(ids)
    v = torch.randn(out.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out.logits, params, v)
    x = model.wte(ids) + model.wpe(torch.arange(7)[None])
    mask = AttentionMask.build(0, 7, None, x.device)
    y = z = x
    for _ in range(4):
        y = 0.5 * y + 0.5 * model.blocks[0](z, x, mask)
        z = 0.5 * z + 0.5 * model.blocks[0](y, x, mask)
    want = torch.autograd.grad(model.lm_head(model.ln_f((y + z) / 2)), params, v)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("tol", [None, 1e-2, 0.3], ids=["fixed-steps", "adaptive", "adaptive-early-stop"])
def test_cached_decoding_equals_full_recomputation_with_the_midpoint(tol):
    """The readout's evaluation has the cache's last layer whatever step a solve stopped at (tol 0.3: decode
    solves stop early and leave step layers short, which later solves complete)."""
    model = _midpoint_model(tol=tol)
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        out = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
        logits = [out.logits]
        for t in range(3, 10):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full.logits[real], rtol=0, atol=1e-5)
    steps = model.config.inference_max_steps
    assert len(out.cache.layers) == 1 + 2 * steps + 1
    assert out.cache.layers[-1].get_seq_length() == 10  # every position's readout evaluation is there
    if tol == 0.3:
        assert int(full.solver_position_steps.max()) < steps  # the early stop this case is about happened


def test_a_cache_filled_with_one_readout_refuses_the_other():
    model = _midpoint_model(tol=None)
    ids = _ids(1, 5)
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        model.config.inference_readout = "z"
        with pytest.raises(ValueError, match="cache: filled with solver settings"):
            model(ids[:, 4:], cache=out.cache, use_cache=True)


def test_the_setting_is_checked_and_composes_with_every_solver():
    with pytest.raises(ConfigError, match="inference_readout: must be one of z, midpoint"):
        RevDEQConfig(inference_readout="mean")
    from revdeq_cli.recipes import model_overrides

    assert RevDEQConfig.from_preset("tiny", **model_overrides("equilibrium", "tiny")).inference_readout == "midpoint"
    assert RevDEQConfig().inference_readout == "z"  # a config.json written before the field loads as it was
    for solver in ("picard", "anderson"):  # one iterate: they read z, the preset's default does not refuse them
        torch.manual_seed(0)
        config = RevDEQConfig.from_preset("tiny", vocab_size=VOCAB_SMALL, hidden_size=16, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=16,
                                          **{**model_overrides("equilibrium", "tiny"), "solver": solver,
                                             "adjoint": "unrolled"})
        model = RevDEQForCausalLM(config).eval()
        with torch.no_grad():
            out = model(_ids(1, 6) % VOCAB_SMALL)
        assert out.solver_nfe == 1 + config.eval_max_steps  # no readout evaluation


VOCAB_SMALL = 20
