"""RevDEQForCausalLM: forward, loss, save/load, exact gradients, baselines, call-time settings, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from revdeq_cli import deq
from revdeq_cli.errors import ConfigError, UserError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model.block import AttentionMask

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread; a second one only adds OpenMP stalls on busy CI cores (restored after)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_config(**overrides) -> RevDEQConfig:
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 32}
    return RevDEQConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> RevDEQForCausalLM:
    torch.manual_seed(seed)
    return RevDEQForCausalLM(tiny_config(**overrides))


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_logits_loss_and_solver_statistics():
    model = tiny_model().train()
    ids = tokens()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, VOCAB) and out.logits.dtype == torch.float32
    assert out.solver_steps == 4 and out.solver_nfe == 1 + 2 * 4  # tol 1e-3 is not reached in 4 steps
    assert 0 < out.solver_residual < 10 and out.cache is None
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.solver_backward.nfe == 0
    out.loss.backward()
    assert out.solver_backward.nfe == 2 * 4  # the reversal: one f + VJP per half step
    assert model.last_solver_stats.steps == 4


def test_shift_labels_and_ignored_targets():
    model = tiny_model().eval()
    ids = tokens(length=13)
    with torch.no_grad():
        by_labels = model(ids[:, :-1], labels=ids[:, :-1]).loss
        targets = ids[:, 1:].clone()
        aligned = model(ids[:, :-1], shift_labels=targets).logits
        loss = model(ids[:, :-1], shift_labels=targets).loss
        targets[:, :5] = -100
        masked = model(ids[:, :-1], shift_labels=targets).loss
    torch.testing.assert_close(loss, F.cross_entropy(aligned.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
    torch.testing.assert_close(masked, F.cross_entropy(aligned[:, 5:].reshape(-1, VOCAB), ids[:, 6:].reshape(-1)))
    # labels (shifted inside) over the first 12 tokens = shift_labels over their 11 targets
    torch.testing.assert_close(by_labels, F.cross_entropy(aligned[:, :-1].reshape(-1, VOCAB), ids[:, 1:-1].reshape(-1)))


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_through_automodel(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied, bias=not tied).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RevDEQForCausalLM)
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _grads(model: RevDEQForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_reversible_gradient_of_the_whole_lm_equals_unrolled_autograd():
    model = tiny_model(tol=None, max_steps=6).double().train()
    ids = tokens()
    reversible = _grads(model, ids)
    model.config.adjoint = "unrolled"
    unrolled = _grads(model, ids)
    assert reversible.keys() == unrolled.keys()
    for name, g in unrolled.items():
        assert g.abs().max() > 0, name
        rel = (reversible[name] - g).abs().max() / g.abs().max()
        assert rel <= 1e-8, f"{name}: relative difference {rel:.2e}"


def _train_steps(model: RevDEQForCausalLM, steps: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tokens(batch=4, length=16)
    losses = []
    for _ in range(steps):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        {"solver": "explicit", "num_hidden_layers": 3},
        {"solver": "anderson", "adjoint": "implicit"},
        {"solver": "broyden", "adjoint": "implicit"},
        {"solver": "relaxed", "adjoint": "phantom", "phantom_steps": 2},
        {"solver": "reversible", "adjoint": "reversible"},
    ],
)
def test_baselines_and_revdeq_train(overrides):
    model = tiny_model(**overrides)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # 12 steps, judged on the last 3: the implicit (IFT) gradient of an untrained, unconverged solve is far from
    # the true one (benchmarks/gradient_error.py), so its first few steps need not lower the loss
    losses = _train_steps(model, 12)
    assert sum(losses[-3:]) / 3 < losses[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "blocks.0.attn.c_attn.weight" in changed and "wte.weight" in changed


def test_explicit_baseline_is_a_stack_of_untied_blocks():
    model = tiny_model(solver="explicit", num_hidden_layers=3).eval()
    assert len(model.blocks) == 3
    assert model.blocks[0].mlp.c_fc.weight.data_ptr() != model.blocks[1].mlp.c_fc.weight.data_ptr()
    with torch.no_grad():
        out = model(tokens())
    assert out.solver_steps == 3 and out.solver_nfe == 3
    # an ordinary GPT: the embeddings are the initial state, each block a pre-LN residual block
    ids = tokens()
    with torch.no_grad():
        z = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))
        for block in model.blocks:
            h = z + block.attn(block.ln_1(z), mask=AttentionMask())
            z = h + block.mlp(block.ln_2(h))
        torch.testing.assert_close(model.lm_head(model.ln_f(z)), model(ids).logits)


@pytest.mark.parametrize("solver", ["reversible", "picard", "relaxed", "anderson", "broyden", "explicit"])
def test_earlier_positions_never_see_later_tokens(solver):
    adjoint = "reversible" if solver == "reversible" else "implicit"
    model = tiny_model(solver=solver, adjoint=adjoint, inference_max_steps=6,
                       num_hidden_layers=2 if solver == "explicit" else 1).eval()
    ids = tokens(batch=1, length=16)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_solver_settings_are_read_at_call_time_on_a_loaded_model(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        four = model(ids)
        model.config.inference_max_steps = 2
        two = model(ids)
        model.config.inference_tol = 1e9  # stops after the first step
        one = model(ids)
    assert (four.solver_steps, two.solver_steps, one.solver_steps) == (4, 2, 1)
    assert (four.solver_nfe, two.solver_nfe) == (9, 5)
    assert not torch.allclose(four.logits, two.logits)
    model.train()
    model.config.tol = 1e9
    assert model(ids).solver_steps == 1
    model.config.beta = 1.0  # a change by hand is checked by check(), not per call
    with pytest.raises(ConfigError, match="^beta: "):
        model.config.check()


def test_eval_mode_runs_the_fixed_inference_schedule():
    model = tiny_model(max_steps=3, inference_max_steps=5, tol=1e9).eval()
    with torch.no_grad():
        assert model(tokens()).solver_steps == 5  # inference_tol None: no early stop
    model.train()
    assert model(tokens()).solver_steps == 1


def test_state_dtype_is_a_setting():
    model = tiny_model(tol=None).eval()
    ids = tokens()
    with torch.no_grad():
        wide = model(ids).logits
        model.config.state_dtype = "float32"
        narrow = model(ids).logits
    torch.testing.assert_close(wide, narrow, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_float64_states():
    model = tiny_model().train()
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.solver_backward.nfe == 8


def test_sequence_longer_than_the_context_fails_naming_the_field():
    model = tiny_model()
    with pytest.raises(UserError, match="max_position_embeddings=32"):
        model(tokens(length=33))


def test_inconsistent_arguments_are_refused():
    model = tiny_model()
    ids = tokens()
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids, shift_labels=ids)
    with pytest.raises(ValueError, match="attention_mask covers 5 positions, expected 12"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(UserError, match="max_position_embeddings"):
        model(tokens(length=4), position_ids=torch.arange(30, 34).expand(2, -1))


def test_dropout_is_allowed_but_off_by_default():
    assert tiny_config().dropout == 0.0
    model = tiny_model(dropout=0.1).train()
    ids = tokens()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_deq_solve_is_used_with_the_configured_solver(monkeypatch):
    seen = []
    real = deq.solve

    def spy(*args, **kwargs):
        seen.append((type(kwargs["solver"]).__name__, type(kwargs["adjoint"]).__name__, kwargs["tol"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(deq, "solve", spy)
    model = tiny_model(solver="anderson", adjoint="implicit").train()
    model(tokens())
    assert seen == [("Anderson", "ImplicitAdjoint", 1e-3)]
