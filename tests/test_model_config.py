"""RevDEQConfig: presets, validation with field-naming errors, Auto registration, parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from revdeq_cli.errors import ConfigError, UserError
from revdeq_cli.model import PRESETS, RevDEQConfig, RevDEQForCausalLM, register_auto_classes


def test_paper_preset_is_the_papers_language_setting():
    cfg = RevDEQConfig.from_preset("paper")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (768, 12, 3072)
    assert (cfg.max_position_embeddings, cfg.vocab_size) == (448, 50304)
    assert (cfg.solver, cfg.adjoint, cfg.beta, cfg.tol, cfg.max_steps) == ("reversible", "reversible", 0.5, 1e-3, 4)
    assert cfg.state_dtype == "float64" and cfg.num_hidden_layers == 1 and not cfg.tie_word_embeddings


def test_presets_build_and_take_overrides():
    assert set(PRESETS) == {"tiny", "small", "base", "paper"}
    widths = [RevDEQConfig.from_preset(name).hidden_size for name in ("tiny", "small", "base", "paper")]
    assert widths == sorted(widths)
    cfg = RevDEQConfig.from_preset("tiny", vocab_size=256, beta=0.7)
    assert cfg.vocab_size == 256 and cfg.beta == 0.7 and cfg.hidden_size == PRESETS["tiny"]["hidden_size"]
    with pytest.raises(ConfigError, match="preset"):
        RevDEQConfig.from_preset("huge")


def test_intermediate_size_defaults_to_four_times_width():
    assert RevDEQConfig(hidden_size=48, num_attention_heads=4).intermediate_size == 192


@pytest.mark.parametrize(
    ("fields", "field_named"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"beta": 1.0}, "beta"),
        ({"beta": 2.5}, "beta"),
        ({"solver": "anderson", "adjoint": "reversible"}, "adjoint"),
        ({"solver": "newton"}, "solver"),
        ({"adjoint": "magic"}, "adjoint"),
        ({"num_hidden_layers": 3}, "num_hidden_layers"),
        ({"tol": -1.0}, "tol"),
        ({"max_steps": 0}, "max_steps"),
        ({"inference_max_steps": -1}, "inference_max_steps"),
        ({"state_dtype": "float16"}, "state_dtype"),
        ({"dropout": 1.0}, "dropout"),
        ({"cache_mode": "paged"}, "cache_mode"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_impossible_configs_fail_naming_the_field(fields, field_named):
    with pytest.raises(ConfigError, match=f"^{field_named}: "):
        RevDEQConfig(**fields)


@pytest.mark.parametrize(
    "field, value",
    [("beta", 1.0), ("max_steps", True), ("max_steps", 4.0), ("tol", [1e-3]), ("solver", "newton"), ("tol", -1.0)],
)
def test_a_change_by_hand_is_refused_by_check(field, value):
    """The config is validated when it is made, not per forward call; a field changed by hand is checked by
    calling `check()` again (as `revdeq eval`'s overrides are validated where they are given)."""
    cfg = RevDEQConfig.from_preset("tiny", vocab_size=64, max_steps=1)
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=f"^{field}: "):
        cfg.check()


def test_options_of_the_baselines_are_checked_against_the_solver_and_gradient():
    cfg = RevDEQConfig(solver="anderson", adjoint="implicit", solver_options={"m": 3},
                       adjoint_options={"max_steps": 7})
    assert cfg.solver_kwargs()["anderson_m"] == 3
    assert cfg.adjoint_kwargs() == {"solver": "anderson", "implicit_tol": 1e-4, "implicit_max_steps": 7}
    for fields, words in (({"solver_options": {"m": 3}}, "reversible takes no option 'm'"),
                          ({"solver": "anderson", "adjoint": "implicit", "solver_options": {"m": 0}}, "m: must be"),
                          ({"adjoint": "unrolled", "adjoint_options": {"tol": 1e-3}}, "unrolled takes no option")):
        with pytest.raises(ConfigError, match=words):
            RevDEQConfig(**fields)


def test_config_error_is_a_user_error_with_one_line():
    with pytest.raises(UserError) as info:
        RevDEQConfig(hidden_size=30, num_attention_heads=4)
    assert "\n" not in str(info.value) and "hidden_size 30" in str(info.value)


def test_explicit_baseline_config_allows_many_layers_and_any_adjoint():
    cfg = RevDEQConfig(solver="explicit", num_hidden_layers=6, beta=1.0)
    assert not cfg.is_deq and cfg.num_hidden_layers == 6


def test_config_round_trips_through_autoconfig(tmp_path):
    register_auto_classes()
    register_auto_classes()  # idempotent
    cfg = RevDEQConfig.from_preset("tiny", vocab_size=100, inference_max_steps=7, tol=None, bias=False)
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RevDEQConfig)
    fields = [name for name in RevDEQConfig.__dataclass_fields__ if name != "transformers_version"]
    assert fields and {n: getattr(loaded, n) for n in fields} == {n: getattr(cfg, n) for n in fields}


def test_parameter_counts_split_embeddings_and_count_a_tied_head_once():
    cfg = RevDEQConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, max_position_embeddings=16)
    split = RevDEQForCausalLM(cfg).num_parameters_split()
    embedding = 100 * 32 + 16 * 32
    block = (3 * 32 * 32 + 3 * 32) + (32 * 32 + 32) + (128 * 32 + 128) + (32 * 128 + 32) + 2 * (2 * 32)
    head = 100 * 32
    ln_f = 2 * 32
    assert split == {"total": embedding + block + ln_f + head, "embedding": embedding,
                     "non_embedding": block + ln_f + head}
    tied = RevDEQForCausalLM(RevDEQConfig(**{**cfg.to_diff_dict(), "tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.num_parameters_split() == {"total": embedding + block + ln_f, "embedding": embedding,
                                           "non_embedding": block + ln_f}


def test_paper_parameter_count():
    with torch.device("meta"):
        model = RevDEQForCausalLM(RevDEQConfig.from_preset("paper"))
    split = model.num_parameters_split()
    assert split["embedding"] == 50304 * 768 + 448 * 768
    # one bias-free block (7.08M) + final LayerNorm + untied head
    assert split["non_embedding"] == 12 * 768 * 768 + 4 * 768 + 2 * 768 + 50304 * 768
