"""The model options of the recipes (init_state) keep both guarantees: the
reversible gradient equals autograd through the unrolled iteration, and cached decoding equals a full
recomputation."""

from __future__ import annotations

import math

import pytest
import torch
from test_model_generation import greedy_scores_vs_full_forward
from test_model_lm import _one_thread, tiny_model, tokens  # noqa: F401  (autouse fixture: one torch thread)

from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig

OPTIONS = [
    {"init_state": "input"},
    {"init_state": "input", "block_skip": "input"},
    {"init_state": "zeros"},
]


def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# beta 0.8 divides by 0.2 at every reversal, so float64 rounding grows ~(1 + 0.8 Lip f) / 0.2 per step: fewer steps
@pytest.mark.parametrize(("beta", "steps"), [(0.5, 5), (0.8, 3)])
@pytest.mark.parametrize("options", OPTIONS)
def test_reversible_gradient_equals_unrolled_in_float64(options, beta, steps):
    model = tiny_model(tol=None, max_steps=steps, beta=beta, **options).double().train()
    ids = tokens()
    reversible = _grads(model, ids)
    model.config.adjoint = "unrolled"
    unrolled = _grads(model, ids)
    for name, g in unrolled.items():
        assert g.abs().max() > 0, name
        rel = float((reversible[name] - g).abs().max() / g.abs().max())
        assert rel <= 1e-10, f"{name}: relative difference {rel:.2e}"


def test_input_init_sends_gradient_through_z0_into_the_embeddings():
    """With z0 = x the token embedding reaches the loss through z0 as well as through the injection; the
    gradient through z0 is exactly the difference between the two models' embedding gradients."""
    ids = tokens()
    grads = {}
    for init in ("zeros", "input"):
        model = tiny_model(tol=None, max_steps=3, init_state=init).double().train()
        grads[init] = _grads(model, ids)["wte.weight"]
    assert not torch.allclose(grads["zeros"], grads["input"])


def test_input_init_changes_the_iterate_not_the_fixed_point():
    """On a contraction both starts reach the same z* (the model's block is not one before training, so the
    solver core is used directly, as the model calls it); a truncated solve differs."""
    from revdeq_cli import deq

    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=torch.float64) * 0.1
    x = torch.randn(3, 16, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ w) + x

    def solve(z0, steps):
        return deq.solve(f, z0, x, solver=deq.Reversible(beta=0.5), adjoint=deq.UnrolledAdjoint(), tol=None,
                         max_steps=steps).z

    torch.testing.assert_close(solve(torch.zeros_like(x), 80), solve(x, 80), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(solve(torch.zeros_like(x), 2), solve(x, 2))
    ids = tokens(batch=1, length=8)
    few = {}
    for init in ("zeros", "input"):
        model = tiny_model(tol=None, max_steps=1, init_state=init).eval()
        with torch.no_grad():
            few[init] = model(ids).logits
    assert not torch.allclose(few["zeros"], few["input"])


@pytest.mark.parametrize("solver", ["reversible", "picard", "anderson"])
@pytest.mark.parametrize("options", OPTIONS)
def test_cached_decoding_equals_full_recomputation(options, solver):
    adjoint = "reversible" if solver == "reversible" else "implicit"
    model = tiny_model(solver=solver, adjoint=adjoint, inference_max_steps=4, **options).eval()
    prompt = tokens(batch=2, length=5)
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=12)
    assert diff <= 1e-4 * scale, (diff, scale)


@pytest.mark.parametrize(("field", "value"), [("init_state", "ones"), ("block_skip", "both")])
def test_bad_option_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RevDEQConfig(vocab_size=16, hidden_size=8, num_attention_heads=2, **{field: value})


def test_options_round_trip_through_config_json(tmp_path):
    model = tiny_model(init_state="input", block_skip="input")
    model.save_pretrained(tmp_path)
    loaded = RevDEQConfig.from_pretrained(tmp_path)
    assert loaded.init_state == "input" and loaded.block_skip == "input"


@pytest.mark.parametrize("layers", [1, 4])
def test_output_projections_start_at_gpt2_scale(layers):
    """std = initializer_range / sqrt(2 * layers) (transformers v5 initialises each parameter once, children
    first: re-initialising from the parent module was silently skipped before, leaving 0.02)."""
    model = tiny_model(seed=0, hidden_size=64, solver="explicit" if layers > 1 else "reversible",
                       num_hidden_layers=layers)
    expected = 0.02 / math.sqrt(2 * layers)
    weights = torch.cat([b.mlp.c_proj.weight.detach().flatten() for b in model.blocks]
                        + [b.attn.c_proj.weight.detach().flatten() for b in model.blocks])
    assert math.isclose(float(weights.std()), expected, rel_tol=0.05)
    assert math.isclose(float(model.blocks[0].attn.c_attn.weight.detach().std()), 0.02, rel_tol=0.05)


def test_the_equilibrium_recipe_starts_at_the_input_but_an_old_config_without_the_field_keeps_z0_zero(tmp_path):
    """The equilibrium recipe's start is z0 = x (a preset is a size only); a config.json written before
    `init_state` existed (no such key) loads as the paper's z0 = 0 model it was trained as."""
    import json

    from revdeq_cli.model.presets import PRESETS
    from revdeq_cli.recipes import model_overrides

    assert not {"init_state", "block_skip", "max_steps"} & {k for p in PRESETS.values() for k in p}
    assert RevDEQConfig.from_preset("tiny", **model_overrides("equilibrium", "tiny")).init_state == "input"
    assert RevDEQConfig.from_preset("tiny", **model_overrides("equilibrium", "tiny")).max_steps == 2
    tiny_model(init_state="input").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["init_state"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert RevDEQConfig.from_pretrained(tmp_path).init_state == "zeros"
