"""Training depth: detached solver steps, random step counts, the training penalties and the input-skip block.

What stays exact: with a detached prefix, the reversible gradient equals autograd through the differentiated
steps unrolled from the detached state (float64, rel <= 1e-10); a random step count is drawn from (seed, step),
so a resumed run draws what the uninterrupted one drew; cached decoding equals a full recomputation for the
input-skip block."""

from __future__ import annotations

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


@pytest.mark.parametrize("skip", ["state", "input"])
def test_model_gradient_with_drawn_depth_equals_the_unrolled_one(skip):
    torch.manual_seed(0)
    config = RevDEQConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
                          init_state="input", block_skip=skip, max_steps=2, tol=None)
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
    for name, g in grads["unrolled"].items():
        assert _rel(grads["reversible"][name], g) <= 1e-9, name


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
    with pytest.raises(ConfigError, match="^objective.detached_steps: "):
        resolve_settings(sets=["objective.detached_steps=uniform:3-1"], environ={})


def test_an_observer_clock_places_the_ramp_and_a_curriculum_in_a_run_without_planned_steps(tmp_path, monkeypatch):
    """A run to a time budget (benchmarks/compare.py) sets its step limit out of reach, so step / total_steps
    would keep the ramp at 0 and a curriculum at its start: `Trainer.set_progress` puts both on its own clock."""
    from revdeq_cli.training.callbacks import Callback
    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.loop import Trainer
    from revdeq_cli.training.objective import TrainingObjective

    seen = []
    penalty_scale, depth = TrainingObjective.penalty_scale, TrainingObjective.depth

    def spy(self, step, total_steps, progress=None):
        seen.append((penalty_scale(self, step, total_steps, progress),
                     depth(self, step, total_steps, progress)["detached_steps"]))
        return seen[-1][0]

    class HalfwayClock(Callback):  # the run is half over after its first step, and over after its fourth
        def on_start(self, trainer):
            trainer.set_progress(0.0)

        def on_step(self, trainer, record):
            trainer.set_progress(trainer.step / 2)
            if trainer.step == 4:
                trainer.request_finish()

    monkeypatch.setattr(TrainingObjective, "penalty_scale", spy)
    settings = tiny_settings(tmp_path / "r", "objective.fixed_point_penalty=0.5", "objective.penalty_ramp=0.5",
                             "objective.detached_steps=poisson-lognormal:0-40:40", train__max_steps=10**6,
                             train__eval_every=0, train__save_every=0)
    Trainer(settings, info=DistInfo(), device=torch.device("cpu"), callbacks=[HalfwayClock()]).run()
    assert [scale for scale, _ in seen] == [0.0, 1.0, 1.0, 1.0]  # progress 0, 0.5 (= the ramp), 1, 1
    assert seen[0][1] == 0 and min(k for _, k in seen[2:]) >= 10  # the curriculum's mean 0, then 40
    # without the clock the same run would sit at the start of both (its planned end is 10**6 steps away)
    rules = (StepRule.parse("2", field="f", minimum=1), StepRule.parse("poisson-lognormal:0-40:40", field="f",
                                                                        minimum=0))
    assert draw_depth(rules, 0, 3, 10**6)["detached_steps"] == 0


def test_zero_inference_steps_read_z0():
    model = make_model(init_state="input")
    ids = torch.randint(0, 48, (1, 8))
    with torch.no_grad():
        out = model(ids, solver_steps=0)
        direct = model.lm_head(model.ln_f(model.wte(ids) + model.wpe(torch.arange(8))[None]))
    assert out.solver_steps == 0 and torch.allclose(out.logits, direct, atol=1e-6)


@pytest.mark.parametrize("solver", ["reversible", "picard"])
def test_input_skip_block_cached_decoding_equals_full_recomputation(solver):
    adjoint = "reversible" if solver == "reversible" else "unrolled"
    model = make_model(block_skip="input", init_state="input", solver=solver, adjoint=adjoint, max_steps=3)
    prompt = torch.tensor([[3, 7, 11, 19, 23], [5, 31, 2, 41, 13]])
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=12)
    assert diff <= 1e-4 * scale, (diff, scale)


def test_resume_with_a_random_depth_is_bit_identical(tmp_path):
    sets = ("objective.detached_steps=uniform:0-2", "objective.fixed_point_penalty=0.5",
            "objective.next_iterate_loss=0.5", "objective.penalty_ramp=0.5")
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
    history = run(tiny_settings(tmp_path / "ramp", "objective.detached_steps=poisson-lognormal:0-40:160")).history
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


def test_inference_steps_default_to_max_steps_and_a_run_stores_the_depth_it_trained_at(tmp_path):
    tiny = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, max_steps=2)
    assert RevDEQConfig(**tiny).eval_max_steps == 2 and RevDEQConfig(**tiny, inference_max_steps=3).eval_max_steps == 3
    run(tiny_settings(tmp_path / "r", "objective.detached_steps=uniform:0-6", "solver.max_steps=2"))
    assert RevDEQConfig.from_pretrained(tmp_path / "r" / "final").inference_max_steps == 5  # 2 + the mean 3


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
