"""Training depth: detached solver steps, random step counts, the training penalties and the input-skip block.

What stays exact: with a detached prefix, the reversible gradient equals autograd through the differentiated
steps unrolled from the detached state (float64, rel <= 1e-10); a random step count is drawn from (seed, step),
so a resumed run draws what the uninterrupted one drew; cached decoding equals a full recomputation for the
input-skip block."""

from __future__ import annotations

import math

import pytest
import torch
from test_deq_gradients import MLPBlock, _rel
from test_model_generation import greedy_scores_vs_full_forward, make_model
from test_train_loop import (  # noqa: F401  (_use_small_corpus, small_corpus: fixtures, the small local corpus)
    InterruptAt,
    _use_small_corpus,
    run,
    small_corpus,
    tiny_settings,
)

from revdeq_cli import deq
from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model.step_rule import StepRule, draw_depth, step_generator
from revdeq_cli.settings import resolve_settings


@pytest.mark.parametrize("beta", [0.5, 1.3])
def test_detached_prefix_then_reversible_gradient_is_exact_for_the_differentiated_steps(beta):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        f = MLPBlock()
        z0 = torch.randn(5, 6)
        x = torch.randn(5, 6, requires_grad=True)
        k, n = 7, 5
        solver = deq.Reversible(beta)
        sol = deq.solve(f, z0, x, solver=solver, adjoint=deq.ReversibleAdjoint(), tol=None, max_steps=n,
                        detached_steps=k)
        assert sol.steps == k + n and sol.nfe == 1 + 2 * (k + n)
        loss = (sol.z**3).sum() + sol.z.sum()
        rev = torch.autograd.grad(loss, [x, *f.parameters()])
        assert sol.backward.nfe == 2 * n  # only the differentiated steps are reversed
        assert sol.backward.reconstruction_error < 1e-10  # rebuilt (y_k, z_k), not z0

        # The reference: the same k steps without a graph, then n steps unrolled by autograd from (y_k, z_k).
        problem = _problem(f, x)
        with torch.no_grad():
            start = deq.iterate(solver, problem, z0, None, k).state
        state = type(start)(z=start.z, y=start.y, fz=problem.evaluate(start.z))  # f(z_k) is differentiated
        for _ in range(n):
            state = solver.step(problem, state)
        ref = torch.autograd.grad((state.z**3).sum() + state.z.sum(), [x, *f.parameters()])
        assert torch.equal(sol.z.detach(), state.z.detach())  # the same iterate as one uninterrupted solve
        for g_rev, g_ref in zip(rev, ref, strict=True):
            assert _rel(g_rev, g_ref) <= 1e-10
    finally:
        torch.set_default_dtype(torch.float32)


def _problem(f, x):
    from revdeq_cli.deq.problem import AutocastState, Problem
    from revdeq_cli.deq.state import StateSpec

    spec = StateSpec.of(torch.zeros(5, 6))
    return Problem(f=f, x=x, spec=spec, state_dtype=torch.float64, autocast=AutocastState.capture("cpu"))


def test_detached_steps_give_no_gradient_to_z0_and_are_refused_when_negative():
    torch.manual_seed(0)
    f = MLPBlock()
    z0 = torch.randn(3, 6, requires_grad=True)
    sol = deq.solve(f, z0, torch.randn(3, 6), solver=deq.Reversible(0.5), tol=None, max_steps=2, detached_steps=3)
    (g,) = torch.autograd.grad(sol.z.sum(), [z0], allow_unused=True)
    assert g is None or float(g.abs().max()) == 0.0
    with pytest.raises(ValueError, match="detached_steps"):
        deq.solve(f, z0, None, solver=deq.Picard(), detached_steps=-1)


@pytest.mark.parametrize(("skip", "output_norm"), [("state", False), ("input", False), ("input", True)])
def test_model_gradient_with_drawn_depth_equals_the_unrolled_one(skip, output_norm):
    torch.manual_seed(0)
    config = RevDEQConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
                          init_state="input", block_skip=skip, block_output_norm=output_norm, max_steps=2, tol=None)
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        torch.manual_seed(1)
        model = RevDEQForCausalLM(RevDEQConfig(**{**config.to_dict(), "adjoint": adjoint})).double().train()
        ids = torch.randint(0, 40, (2, 12))
        out = model(ids, labels=ids, solver_steps=3, detached_steps=4)
        assert out.solver_steps == 7
        out.loss.backward()
        grads[adjoint] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["reversible"].keys() == grads["unrolled"].keys()
    assert ("blocks.0.ln_out.weight" in grads["reversible"]) == output_norm
    for name, g in grads["unrolled"].items():
        assert _rel(grads["reversible"][name], g) <= 1e-9, name


def test_block_output_norm_normalises_f_per_position_and_is_refused_when_not_a_bool():
    model = make_model(block_skip="input", init_state="input", block_output_norm=True)
    block = model.blocks[0]
    with torch.no_grad():
        out = block(torch.randn(2, 6, model.config.hidden_size), torch.randn(2, 6, model.config.hidden_size))
    # at initialisation LN_out is the plain standardisation: every position has mean 0 and variance 1
    assert torch.allclose(out.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 6), atol=1e-3)
    assert make_model(block_skip="input").blocks[0].ln_out is None
    with pytest.raises(ConfigError, match="block_output_norm"):
        RevDEQConfig(block_output_norm="yes")


@pytest.mark.parametrize(("noise", "detached"), [("train_init_noise", 0), ("train_state_noise", 4)])
def test_random_start_is_training_only_and_keeps_the_gradient_exact(noise, detached):
    """train_init_noise starts each training solve at z0 + sigma * rms(x) * eps (with no detached steps the
    noisy start is differentiated through); train_state_noise moves the end of the detached steps so. Either
    way the reversible gradient equals autograd's through the differentiated steps unrolled from that start."""
    config = RevDEQConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
                          init_state="input", block_skip="input", max_steps=3, tol=None, **{noise: 0.5})
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 12))
    grads, losses = {}, {}
    for adjoint in ("reversible", "unrolled"):
        torch.manual_seed(1)
        model = RevDEQForCausalLM(RevDEQConfig(**{**config.to_dict(), "adjoint": adjoint})).double().train()
        torch.manual_seed(2)  # the same noise for both
        out = model(ids, labels=ids, detached_steps=detached)
        assert out.solver_steps == 3 + detached
        out.loss.backward()
        losses[adjoint] = float(out.loss.detach())
        grads[adjoint] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert losses["reversible"] == pytest.approx(losses["unrolled"], rel=1e-12)
    for name, g in grads["unrolled"].items():
        assert _rel(grads["reversible"][name], g) <= 1e-10, name
    quiet = RevDEQForCausalLM(RevDEQConfig(**{**config.to_dict(), noise: 0.0})).double()
    quiet.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.manual_seed(3)
        noisy_train = model(ids, detached_steps=detached).logits
        torch.manual_seed(4)
        assert not torch.equal(noisy_train, model(ids, detached_steps=detached).logits)  # a new start per call
        assert not torch.allclose(noisy_train, quiet.train()(ids, detached_steps=detached).logits, atol=1e-6)
        assert torch.equal(model.eval()(ids).logits, quiet.eval()(ids).logits)  # inference starts at z0
    with pytest.raises(ConfigError, match=f"^{noise}: "):
        RevDEQConfig(**{noise: -1.0})


def test_step_rules_parse_draw_and_refuse_with_the_field_named():
    assert StepRule.parse("3", field="f", minimum=1).draw(step_generator(0, 0)) == 3
    uniform = StepRule.parse("uniform:1-4", field="f", minimum=1)
    draws = [uniform.draw(step_generator(0, s)) for s in range(400)]
    assert set(draws) == {1, 2, 3, 4}
    assert draws == [uniform.draw(step_generator(0, s)) for s in range(400)]  # a function of (seed, step)
    heavy = StepRule.parse("poisson-lognormal:6:24", field="f", minimum=0)
    values = [heavy.draw(step_generator(1, s)) for s in range(2000)]
    assert 0 <= min(values) and max(values) <= 24 and 5.0 < sum(values) / len(values) < 7.0
    assert max(values) >= 15  # heavy-tailed: some deep draws
    wide = StepRule.parse("poisson-lognormal:6:48:1", field="f", minimum=0)
    assert str(wide) == "poisson-lognormal:6:48:1" and str(heavy) == "poisson-lognormal:6:24"  # round trip
    assert StepRule.parse(str(wide), field="f", minimum=0) == wide
    wide_values = [wide.draw(step_generator(1, s)) for s in range(2000)]
    deep = [sum(v >= 20 for v in vs) for vs in (values, wide_values)]
    assert 5.0 < sum(wide_values) / len(wide_values) < 7.0 and deep[1] > 4 * deep[0]  # same mean, heavier tail
    ramp = StepRule.parse("poisson-lognormal:0-18:72", field="f", minimum=0)
    assert str(ramp) == "poisson-lognormal:0-18:72" and StepRule.parse(str(ramp), field="f", minimum=0) == ramp
    assert ramp.mean_at(0.0) == 0.0 and ramp.mean_at(0.5) == 9.0 and ramp.mean_at(1.0) == 18.0
    assert ramp.draw(step_generator(0, 0), 0.0) == 0  # mean 0 at the start of the run: no graph-free steps
    early = [ramp.draw(step_generator(2, s), 0.1) for s in range(2000)]
    late = [ramp.draw(step_generator(2, s), 1.0) for s in range(2000)]
    assert 1.0 < sum(early) / 2000 < 2.6 and 16.5 < sum(late) / 2000 < 19.5 and max(late) <= 72
    over_run = [draw_depth((uniform, ramp), 3, s, 100)["detached_steps"] for s in range(100)]
    assert over_run == [draw_depth((uniform, ramp), 3, s, 100)["detached_steps"] for s in range(100)]  # (seed, step)
    assert sum(over_run[:20]) < sum(over_run[-20:])  # the curriculum rises over the run
    for bad, words in (("uniform:4-1", "wrong way round"), ("zero", "not a step rule"), ("0", "at least 1"),
                       ("poisson-lognormal:6:24:0", "sigma must be in"), ("poisson-lognormal:9-3", "falls")):
        with pytest.raises(ConfigError, match=f"^f: .*{words}"):
            StepRule.parse(bad, field="f", minimum=1)
    with pytest.raises(ConfigError, match="^solver.train_steps: "):
        resolve_settings(sets=["solver.train_steps=uniform:3-1"], environ={})
    with pytest.raises(ConfigError, match="^train_detached_steps: "):
        RevDEQConfig(train_detached_steps="lots")


def test_fixed_point_penalty_is_in_the_loss_and_lm_loss_is_the_cross_entropy():
    torch.manual_seed(0)
    model = make_model(fixed_point_penalty=1.0, jacobian_penalty=0.5, init_state="input").train()
    ids = torch.randint(0, 48, (2, 10))
    out = model(ids, labels=ids)
    assert float(out.regularization.detach()) > 0
    assert torch.allclose(out.loss, out.lm_loss + out.regularization)
    out.loss.backward()  # the Jacobian term's double backward runs (math attention kernel)
    model.eval()
    with torch.no_grad():
        assert model(ids, labels=ids).regularization is None  # training only


@pytest.mark.parametrize("tail", [1.0, 0.25, 1e-6])
def test_fixed_point_penalty_tail_is_the_mean_over_the_largest_residuals(tail):
    """q = 1 is the mean over every position; q < 1 the mean over the ceil(q * B * T) largest ratios (1e-6:
    the single worst position), computed here by hand from f at the model's own solver output."""
    torch.manual_seed(0)
    model = make_model(fixed_point_penalty=2.0, fixed_point_penalty_tail=tail, init_state="input",
                       block_skip="input").train()
    ids = torch.randint(0, 48, (2, 10))
    captured = {}
    original = model._penalties

    def spy(z, x, mask):
        captured.update(z=z.detach(), x=x.detach(), mask=mask)
        return original(z, x, mask)

    model._penalties = spy
    out = model(ids, labels=ids)
    z, x = captured["z"], captured["x"]
    with torch.no_grad():
        fz = model.blocks[0](z, x, captured["mask"])
        ratios = ((fz - z).pow(2).sum(-1) / fz.pow(2).sum(-1)).flatten().sort(descending=True).values
    k = max(1, math.ceil(tail * ratios.numel()))
    assert k == (20 if tail == 1.0 else 5 if tail == 0.25 else 1)
    expected = 2.0 * ratios[:k].mean()
    assert torch.allclose(out.regularization.detach(), expected.float(), rtol=1e-5), (out.regularization, expected)
    if tail < 1:  # the tail is larger than the mean, so at equal lam the penalty is stronger
        assert float(expected) > 2.0 * float(ratios.mean())


def test_fixed_point_penalty_tail_is_validated():
    with pytest.raises(ConfigError, match="^fixed_point_penalty_tail: must be in \\(0, 1\\]"):
        RevDEQConfig(fixed_point_penalty_tail=0.0)
    with pytest.raises(ConfigError, match="^fixed_point_penalty_tail: "):
        RevDEQConfig(fixed_point_penalty_tail=1.5)


@pytest.mark.parametrize("penalty", [0.3, 0.0])
def test_next_iterate_loss_adds_the_cross_entropy_read_at_f_of_the_output(penalty):
    """loss = CE(z_N) + mu * CE(f(z_N)) + penalties, with f(z_N) the fixed-point penalty's own evaluation of the
    block (no second one), or one evaluation of its own with the penalty off; lm_loss stays CE(z_N); training only."""
    torch.manual_seed(0)
    model = make_model(fixed_point_penalty=penalty, next_iterate_loss=0.7, init_state="input",
                       block_skip="input").train()
    ids = torch.randint(0, 48, (2, 10))
    block, calls, captured = model.blocks[0], [], {}
    forward, penalties = type(block).forward, model._penalties

    def count(*args, **kwargs):
        calls.append(1)
        return forward(block, *args, **kwargs)

    def spy(z, x, mask):
        captured.update(z=z.detach(), x=x.detach(), mask=mask, calls=len(calls))
        return penalties(z, x, mask)

    block.forward, model._penalties = count, spy
    out = model(ids, labels=ids, solver_steps=2)
    assert len(calls) - captured["calls"] == 1  # f(z_N): one evaluation for the penalty and the readout
    with torch.no_grad():
        fz = forward(block, captured["z"], captured["x"], captured["mask"])
        logits = model.lm_head(model.ln_f(fz))[:, :-1]
        next_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, out.lm_loss + 0.7 * next_ce + out.regularization, rtol=1e-6)
    assert (float(out.regularization.detach()) > 0) == (penalty > 0)
    assert model.last_solver_stats.next_iterate is None  # no activations kept past the forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids).loss, model(ids, labels=ids).lm_loss)  # training only
    with pytest.raises(ConfigError, match="^next_iterate_loss: must be a number >= 0"):
        RevDEQConfig(next_iterate_loss=-1.0)


def test_next_iterate_loss_keeps_the_reversible_gradient_exact():
    """The extra cross-entropy reaches the block through f(z_N) and, through z_N, the reversible steps: the
    gradient equals autograd's through the unrolled differentiated steps (float64)."""
    config = RevDEQConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
                          init_state="input", block_skip="input", max_steps=2, tol=None, fixed_point_penalty=0.3,
                          fixed_point_penalty_tail=0.25, next_iterate_loss=1.0)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        torch.manual_seed(1)
        model = RevDEQForCausalLM(RevDEQConfig(**{**config.to_dict(), "adjoint": adjoint})).double().train()
        model(ids, labels=ids, solver_steps=2, detached_steps=3).loss.backward()
        grads[adjoint] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["reversible"].keys() == grads["unrolled"].keys()
    for name, g in grads["unrolled"].items():
        assert _rel(grads["reversible"][name], g) <= 1e-10, name


def test_penalty_ramp_scales_the_penalties_by_the_place_in_the_run_and_is_validated():
    config = RevDEQConfig(fixed_point_penalty=0.3, penalty_ramp=0.2)
    assert [config.penalty_scale(s, 1200) for s in (0, 60, 120, 240, 1199)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert config.penalty_scale(5, None) == 1.0 and RevDEQConfig().penalty_scale(0, 1200) == 1.0
    for bad in (-0.1, 1.0, "0.2", True):
        with pytest.raises(ConfigError, match="^penalty_ramp: must be in \\[0, 1\\)"):
            RevDEQConfig(penalty_ramp=bad)
    # the forward adds scale x the penalties, and reports them as added
    torch.manual_seed(0)
    model = make_model(fixed_point_penalty=2.0, init_state="input", block_skip="input").train()
    ids = torch.randint(0, 48, (2, 10))
    full, half = model(ids, labels=ids), model(ids, labels=ids, penalty_scale=0.5)
    assert torch.equal(full.lm_loss, half.lm_loss)
    assert torch.allclose(half.regularization, 0.5 * full.regularization, rtol=1e-6)
    assert torch.allclose(half.loss, half.lm_loss + 0.5 * full.regularization, rtol=1e-6)
    assert float(model(ids, labels=ids, penalty_scale=0.0).loss.detach()) == float(full.lm_loss.detach())


def test_the_trainer_ramps_the_penalty_in_over_its_planned_steps(tmp_path, monkeypatch):
    scales = []
    forward = RevDEQForCausalLM.forward

    def spy(self, *args, **kwargs):
        if self.training:
            scales.append(kwargs.get("penalty_scale"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RevDEQForCausalLM, "forward", spy)
    history = run(tiny_settings(tmp_path / "r", "solver.fixed_point_penalty=0.5", "solver.penalty_ramp=0.5")).history
    n = len(history)
    assert n >= 4 and scales == [min(1.0, s / (0.5 * n)) for s in range(n)], (n, scales)
    scales.clear()
    run(tiny_settings(tmp_path / "off", "solver.fixed_point_penalty=0.5", "solver.penalty_ramp=0"))
    assert scales and set(scales) == {None}  # no ramp: nothing passed, the loss as before


def test_an_observer_clock_places_the_ramp_and_a_curriculum_in_a_run_without_planned_steps(tmp_path, monkeypatch):
    """A run to a time budget (benchmarks/compare.py) sets its step limit out of reach, so step / total_steps
    would keep the ramp at 0 and a curriculum at its start: `Trainer.set_progress` puts both on its own clock."""
    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.loop import Trainer

    seen = []
    forward = RevDEQForCausalLM.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen.append((kwargs.get("penalty_scale"), kwargs.get("detached_steps")))
        return forward(self, *args, **kwargs)

    class HalfwayClock:  # the run is half over after its first step, and over after its fourth
        def on_start(self, trainer):
            trainer.set_progress(0.0)

        def on_step(self, trainer, record):
            trainer.set_progress(trainer.step / 2)
            if trainer.step == 4:
                trainer.request_finish()

    monkeypatch.setattr(RevDEQForCausalLM, "forward", spy)
    settings = tiny_settings(tmp_path / "r", "solver.fixed_point_penalty=0.5", "solver.penalty_ramp=0.5",
                             "solver.train_detached_steps=poisson-lognormal:0-40:40", train__max_steps=10**6,
                             train__eval_every=0, train__save_every=0)
    Trainer(settings, info=DistInfo(), device=torch.device("cpu"), observers=[HalfwayClock()]).run()
    assert [scale for scale, _ in seen] == [0.0, 1.0, 1.0, 1.0]  # progress 0, 0.5 (= the ramp), 1, 1
    assert seen[0][1] == 0 and min(k for _, k in seen[2:]) >= 10  # the curriculum's mean 0, then 40
    # without the clock the same run would sit at the start of both (its planned end is 10**6 steps away)
    rules = RevDEQConfig(train_detached_steps="poisson-lognormal:0-40:40").step_rules()
    assert draw_depth(rules, 0, 3, 10**6)["detached_steps"] == 0
    assert RevDEQConfig(fixed_point_penalty=0.5, penalty_ramp=0.5).penalty_scale(3, 10**6) < 1e-4


def test_zero_inference_steps_read_z0():
    model = make_model(init_state="input")
    ids = torch.randint(0, 48, (1, 8))
    with torch.no_grad():
        out = model(ids, solver_steps=0)
        direct = model.lm_head(model.ln_f(model.wte(ids) + model.wpe(torch.arange(8))[None]))
    assert out.solver_steps == 0 and torch.allclose(out.logits, direct, atol=1e-6)


@pytest.mark.parametrize(("solver", "output_norm"), [("reversible", False), ("picard", False), ("reversible", True)])
def test_input_skip_block_cached_decoding_equals_full_recomputation(solver, output_norm):
    adjoint = "reversible" if solver == "reversible" else "unrolled"
    model = make_model(block_skip="input", init_state="input", solver=solver, adjoint=adjoint, max_steps=3,
                       block_output_norm=output_norm)
    prompt = torch.tensor([[3, 7, 11, 19, 23], [5, 31, 2, 41, 13]])
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=12)
    assert diff <= 1e-4 * scale, (diff, scale)


def test_resume_with_a_random_depth_is_bit_identical(tmp_path):
    sets = ("solver.train_steps=uniform:1-3", "solver.train_detached_steps=uniform:0-2",
            "solver.fixed_point_penalty=0.5", "solver.train_init_noise=0.5", "solver.train_state_noise=0.2",
            "solver.penalty_ramp=0.5")
    full = run(tiny_settings(tmp_path / "full", *sets))
    assert len({h["solver_steps"] for h in full.history}) > 1  # the depth really varies
    with pytest.raises(KeyboardInterrupt):
        run(tiny_settings(tmp_path / "cut", *sets), progress=InterruptAt(4))
    resumed = run(tiny_settings(tmp_path / "cut", *sets, train__resume="auto"))
    assert [h["step"] for h in resumed.history] == [5, 6]
    for a, b in zip(full.history[4:], resumed.history, strict=True):
        assert (a["loss"], a["grad_norm"], a["solver_steps"]) == (b["loss"], b["grad_norm"], b["solver_steps"])
    assert resumed.final_val_loss == full.final_val_loss


def test_the_trainer_draws_a_curriculum_by_its_place_in_the_run(tmp_path):
    history = run(tiny_settings(tmp_path / "ramp", "solver.train_detached_steps=poisson-lognormal:0-40:160")).history
    first, last = history[0]["solver_steps"], history[-1]["solver_steps"]
    # step 1 of the run: mean 0, no graph-free steps; the last step: mean 40 (the loop passes its planned length)
    assert first <= 4 and last >= first + 8, (first, last)


def test_evaluation_scores_the_tail_window_unpadded_and_its_residual_covers_real_positions_only():
    import numpy as np

    from revdeq_cli.training.evaluate import evaluate_split

    model = make_model(init_state="input")
    tokens = np.random.default_rng(0).integers(1, 48, size=16 * 3 + 5 + 1)  # 3 full windows and a 5-token tail
    got = evaluate_split(model, tokens, split_bytes=len(tokens), seq_len=16, batch_size=4, solver_steps=3)
    inputs, targets = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
    nll, residual = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), 16):
            out = model(inputs[None, start:start + 16], shift_labels=targets[None, start:start + 16], solver_steps=3)
            n = min(16, len(inputs) - start)
            nll, residual = nll + float(out.loss) * n, max(residual, out.solver_residual)
    assert got.tokens == len(tokens) - 1
    assert abs(got.nll - nll) < 1e-3 and abs(got.max_residual - residual) < 1e-9


def test_inference_steps_default_to_the_training_depth():
    tiny = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, max_steps=2)
    assert RevDEQConfig(**tiny).eval_max_steps == 2  # configs without step rules: max_steps, as before
    assert RevDEQConfig(**tiny, train_detached_steps="poisson-lognormal:6:24").eval_max_steps == 8
    assert RevDEQConfig(**tiny, train_steps="uniform:1-4", train_detached_steps="uniform:0-2").eval_max_steps == 4
    assert RevDEQConfig(**tiny, train_detached_steps="uniform:0-6", inference_max_steps=3).eval_max_steps == 3


def test_probe_equilibrium_matches_the_forward_and_shows_each_position():
    model = make_model(seed=3, block_skip="input", init_state="input", dropout=0.3).train()
    ids = torch.randint(1, 32, (3, 20))
    probe = model.probe_equilibrium(ids, solver_steps=5)
    assert model.training  # the mode it was in is restored
    again = model.probe_equilibrium(ids, solver_steps=5)
    assert torch.equal(again.fz, probe.fz) and torch.equal(again.logits, probe.logits)  # eval mode: no dropout
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, solver_steps=5)
    assert torch.allclose(probe.logits, out.logits, atol=1e-6)  # the same solve as an eval-mode forward
    assert probe.residual.shape == (3, 20) and probe.residual.dtype == torch.float64
    window = (probe.z - probe.fz).double().flatten(1).norm(dim=1) / (1e-5 + probe.fz.double().flatten(1).norm(dim=1))
    assert abs(float(window.max()) - out.solver_residual) <= 1e-5 * max(1.0, out.solver_residual)
    # a window's residual is dominated by its worst positions: never above the largest per-position one
    assert float(window.max()) <= float(probe.residual.max()) + 1e-9
    assert torch.equal(model.probe_equilibrium(ids, solver_steps=0).z, probe.x)  # 0 steps: z0 = x
    with pytest.raises(ValueError, match="needs a DEQ"):
        make_model(solver="explicit", num_hidden_layers=1).probe_equilibrium(ids)
