"""The training objective (training/objective.py): its terms by hand from the model's own output, one evaluation of
f for both, the exact reversible gradient with every term on, the penalty's ramp and the graph-free depth draw."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_deq_gradients import _rel
from test_model_generation import make_model
from test_train_loop import (  # noqa: F401  (_use_small_corpus, small_corpus: fixtures, the small local corpus)
    _use_small_corpus,
    run,
    small_corpus,
    tiny_settings,
)

from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.settings import ObjectiveSettings, resolve_settings
from revdeq_cli.training.objective import TrainingObjective


def _objective(config, **settings) -> TrainingObjective:
    return TrainingObjective(ObjectiveSettings(**settings), config, seed=0)


def _ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("tail", [1.0, 0.25, 1e-6])
@pytest.mark.parametrize("penalty, mu", [(2.0, 0.0), (0.3, 0.7), (0.0, 0.7)])
def test_each_term_by_hand_from_the_models_own_output(tail, penalty, mu):
    """loss = CE(z_N) + mu * CE(f(z_N)) + lam * mean over the worst ceil(q * B * T) positions of
    ||f(z_N) - z_N||^2 / ||f(z_N)||^2, with f(z_N) evaluated once for both terms; `cross_entropy` is CE(z_N)."""
    model = make_model(init_state="input", block_skip="input").train()
    ids = torch.randint(0, 48, (2, 11), generator=torch.Generator().manual_seed(0))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    objective = _objective(model.config, fixed_point_penalty=penalty, penalty_tail=tail, next_iterate_loss=mu)
    block, calls = model.blocks[0], []
    block.register_forward_hook(lambda *args: calls.append(1))
    terms = objective(model, inputs, targets, step=0, total_steps=None)
    assert len(calls) == 1 + 2 * model.config.max_steps + 1  # init, 2 per reversible step, f(z_N) once
    z, fz = terms.output.state.detach(), terms.output.next_state.detach()
    with torch.no_grad():
        assert torch.equal(fz, block(z, model.wte(inputs) + model.wpe(torch.arange(10))[None]))
        ce = _ce(model.read_out(z), targets)
        ratios = ((fz - z).pow(2).sum(-1) / fz.pow(2).sum(-1)).flatten().sort(descending=True).values
        k = max(1, math.ceil(tail * ratios.numel()))
        expected = ce + mu * _ce(model.read_out(fz), targets) + penalty * ratios[:k].mean()
    assert torch.allclose(terms.cross_entropy.detach(), ce)
    assert torch.allclose(terms.loss.detach(), expected, rtol=1e-6)
    assert (terms.penalty is None) == (penalty == 0)


def test_plain_cross_entropy_asks_for_no_extra_evaluation():
    model = make_model(init_state="input").train()
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1))
    terms = _objective(model.config)(model, ids[:, :-1], ids[:, 1:], step=0, total_steps=10)
    assert terms.output.next_state is None and terms.penalty is None
    assert torch.equal(terms.loss, terms.cross_entropy)
    explicit = make_model(solver="explicit", num_hidden_layers=2).train()
    plain = _objective(explicit.config, fixed_point_penalty=1.0, detached_steps="poisson-lognormal:6")
    assert plain.training_depth is None and plain.depth(0, 10) == {}  # no solver: the cross-entropy alone
    assert torch.equal(plain(explicit, ids[:, :-1], ids[:, 1:], step=0, total_steps=10).loss,
                       explicit(ids[:, :-1], shift_labels=ids[:, 1:]).loss)


def test_the_reversible_gradient_stays_exact_with_every_term():
    """The extra terms reach the block through f(z_N) and, through z_N, the reversible steps after the graph-free
    start: the gradient equals autograd's through the unrolled differentiated steps (float64, rel <= 1e-10)."""
    config = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
                  init_state="input", block_skip="input", max_steps=2, tol=None)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        torch.manual_seed(1)
        model = RevDEQForCausalLM(RevDEQConfig(**config, adjoint=adjoint)).double().train()
        objective = _objective(model.config, detached_steps="3", fixed_point_penalty=0.3, penalty_tail=0.25,
                               next_iterate_loss=1.0, penalty_ramp=0.5)
        terms = objective(model, ids[:, :-1], ids[:, 1:], step=3, total_steps=10)
        assert terms.output.solver_steps == 5  # 3 graph-free + 2 differentiated
        terms.loss.backward()
        grads[adjoint] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["reversible"].keys() == grads["unrolled"].keys()
    for name, g in grads["unrolled"].items():
        assert _rel(grads["reversible"][name], g) <= 1e-10, name


def test_the_ramp_scales_the_penalty_by_the_place_in_the_run():
    config = SimpleNamespace(is_deq=True, max_steps=2)
    objective = _objective(config, fixed_point_penalty=0.3, penalty_ramp=0.2)
    assert [objective.penalty_scale(s, 1200) for s in (0, 60, 120, 240, 1199)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert objective.penalty_scale(5, None) == 1.0 and _objective(config).penalty_scale(0, 1200) == 1.0
    assert objective.penalty_scale(3, 10**6, progress=0.1) == 0.5  # a run on its own clock
    model = make_model(init_state="input", block_skip="input").train()
    ids = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(2))
    ramped = _objective(model.config, fixed_point_penalty=2.0, penalty_ramp=0.5)
    full = ramped(model, ids[:, :-1], ids[:, 1:], step=10, total_steps=10)
    half = ramped(model, ids[:, :-1], ids[:, 1:], step=5, total_steps=20)
    assert torch.allclose(half.penalty, 0.5 * full.penalty, rtol=1e-6)
    assert torch.equal(ramped(model, ids[:, :-1], ids[:, 1:], step=0, total_steps=10).loss, full.cross_entropy)


def test_the_training_depth_is_the_differentiated_steps_plus_the_graph_free_mean():
    config = SimpleNamespace(is_deq=True, max_steps=2)
    assert _objective(config).training_depth == 2
    assert _objective(config, detached_steps="poisson-lognormal:6:24").training_depth == 8
    assert _objective(config, detached_steps="uniform:0-3").training_depth == 4
    draws = [_objective(config, detached_steps="uniform:0-3").depth(s, 100) for s in range(50)]
    assert {d["solver_steps"] for d in draws} == {2} and {d["detached_steps"] for d in draws} == {0, 1, 2, 3}


def test_objective_settings_are_validated_naming_the_key():
    for sets, key in ((["objective.penalty_tail=0"], "objective.penalty_tail"),
                      (["objective.penalty_ramp=1"], "objective.penalty_ramp"),
                      (["objective.next_iterate_loss=-1"], "objective.next_iterate_loss"),
                      (["objective.detached_steps=lots"], "objective.detached_steps")):
        with pytest.raises(ConfigError, match=f"^{key}"):
            resolve_settings(sets=sets, environ={})


def test_the_trainer_ramps_the_penalty_in_over_its_planned_steps(tmp_path, monkeypatch):
    scales = []
    penalty_scale = TrainingObjective.penalty_scale

    def spy(self, step, total_steps, progress=None):
        scales.append(penalty_scale(self, step, total_steps, progress))
        return scales[-1]

    monkeypatch.setattr(TrainingObjective, "penalty_scale", spy)
    history = run(tiny_settings(tmp_path / "r", "objective.fixed_point_penalty=0.5",
                                "objective.penalty_ramp=0.5")).history
    n = len(history)
    assert n >= 4 and scales == [min(1.0, s / (0.5 * n)) for s in range(n)], (n, scales)


def test_an_old_runs_settings_map_to_the_objective_section():
    """A run of revdeq 0.1 stored its objective under solver.*; resumed, it continues with the same terms."""
    from revdeq_cli.settings import settings_from_dict

    old = {"solver": {"train_detached_steps": "poisson-lognormal:6:24", "fixed_point_penalty": 2.0,
                      "fixed_point_penalty_tail": 0.1, "penalty_ramp": 0.2, "next_iterate_loss": 1.0,
                      "train_steps": None, "jacobian_penalty": 0.0, "train_detached_precision": "same"},
           "model": {"output_init_scale": 1.0, "block_output_norm": False}, "train": {"max_steps": 10}}
    s = settings_from_dict(old, "an old run")
    assert (s.objective.detached_steps, s.objective.fixed_point_penalty, s.objective.penalty_tail,
            s.objective.penalty_ramp, s.objective.next_iterate_loss) == ("poisson-lognormal:6:24", 2.0, 0.1, 0.2, 1.0)
    with pytest.raises(ConfigError, match="^solver.jacobian_penalty: removed"):
        settings_from_dict({"solver": {"jacobian_penalty": 0.5}}, "an old run")


# What revdeq 0.1 (commit 1e55d21, the objective inside the model's forward) computed for six steps of the default
# recipe at width 32 on the small corpus, fp32, without early stops: the objective's own module must compute the
# same run (bit for bit on the Intel Xeon that wrote these).
REVDEQ_0_1 = {"losses": [5.570730686187744, 5.481925010681152, 5.27244758605957, 5.182815074920654,
                         5.030362129211426, 5.009653091430664],
              "grad_norms": [4.463527202606201, 3.8448421955108643, 3.075390338897705, 3.125211715698242,
                             2.94696307182312, 2.746331214904785],
              "steps": [15, 4, 9, 5, 12, 5], "val": 4.950796406243437}


def test_the_default_recipe_trains_as_revdeq_0_1_did(tmp_path):
    from cli_helpers import small_corpus as make_corpus

    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.loop import Trainer
    from revdeq_cli.training.progress import NullProgress

    corpus = make_corpus(tmp_path / "c")
    settings = resolve_settings(
        sets=["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
              "train.batch_size=4", "data.seq_len=32", "train.precision=fp32", "train.eval_every=0",
              "train.save_every=0", "train.max_steps=6", "log.tensorboard=false",
              "solver.tol=0"],  # every solve runs its steps: no early stop that rounding could move
        flags={"data.dataset": str(corpus), "data.cache_dir": str(tmp_path / "cache"),
               "train.out_dir": str(tmp_path / "run"), "train.device": "cpu", "data.offline": True}, environ={})
    summary = Trainer(settings, info=DistInfo(), device=torch.device("cpu"), progress=NullProgress()).run()
    assert [h["solver_steps"] for h in summary.history] == REVDEQ_0_1["steps"]  # the same depth draws
    # bit for bit on the machine that wrote them; float32 kernels differ in the last bits between CPUs
    assert [h["loss"] for h in summary.history] == pytest.approx(REVDEQ_0_1["losses"], rel=1e-5)
    assert [h["grad_norm"] for h in summary.history] == pytest.approx(REVDEQ_0_1["grad_norms"], rel=1e-4)
    assert summary.final_val_loss == pytest.approx(REVDEQ_0_1["val"], rel=1e-5)
