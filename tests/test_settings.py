"""Settings: precedence of preset < --config < env < --set < flags, validation errors, earlier-port aliases,
and the CLI's --print-config and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from revdeq_cli.cli.app import main
from revdeq_cli.errors import ConfigError
from revdeq_cli.settings import (
    DEFAULT_MAX_STEPS,
    Settings,
    SettingsWarning,
    resolve_settings,
    settings_from_dict,
)

# The earlier port's default config, in the shared/ dir beside the checkout (or inside it).
_HERE = Path(__file__).resolve().parents[1]
FIXTURE = next((p for p in (_HERE.parent / "shared", _HERE / "shared")
                if (p / "fixtures/revdeq-pytorch/default.yaml").exists()), _HERE.parent / "shared")
FIXTURE = FIXTURE / "fixtures" / "revdeq-pytorch" / "default.yaml"
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f"{FIXTURE} not present")


def test_defaults_take_the_tiny_preset_and_the_offline_pydoc_corpus():
    s = resolve_settings(environ={})
    assert s.model.preset == "tiny" and s.model.hidden_size == 128 and s.model.num_attention_heads == 4
    assert s.solver.solver == "reversible" and s.solver.adjoint == "reversible" and s.solver.beta == 0.5
    assert s.solver.state_dtype == "float64"
    assert s.data.dataset == "pydoc" and s.data.tokenizer == "byte"
    assert s.train.max_steps == DEFAULT_MAX_STEPS


def test_precedence_preset_then_config_then_env_then_set_then_flag(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n  batch_size: 3\nmodel:\n  hidden_size: 64\nsolver.beta: 0.7\n")
    env = {"REVDEQ_TRAIN__LR": "0.2", "REVDEQ_TRAIN__SEED": "5", "REVDEQ_CACHE_DIR": "/ignored"}

    only_file = resolve_settings(config_file=cfg, environ={})
    assert (only_file.train.lr, only_file.train.batch_size, only_file.model.hidden_size) == (0.1, 3, 64)
    assert only_file.solver.beta == 0.7
    assert only_file.model.intermediate_size == 512  # the preset still fills what the file leaves out

    with_env = resolve_settings(config_file=cfg, environ=env)
    assert (with_env.train.lr, with_env.train.seed) == (0.2, 5)

    with_set = resolve_settings(config_file=cfg, environ=env, sets=["train.lr=0.3", "model.hidden_size=96"])
    assert (with_set.train.lr, with_set.model.hidden_size, with_set.train.batch_size) == (0.3, 96, 3)

    with_flag = resolve_settings(config_file=cfg, environ=env, sets=["train.lr=0.3"],
                                 flags={"train.lr": 0.4, "train.batch_size": None})
    assert with_flag.train.lr == 0.4 and with_flag.train.batch_size == 3  # None = flag not given

    other_preset = resolve_settings(flags={"model.preset": "small"}, environ={})
    assert other_preset.model.hidden_size == 256


@needs_fixture
def test_earlier_port_flat_yaml_loads_through_aliases_and_warns_about_meaningless_keys():
    with pytest.warns(SettingsWarning) as caught:
        s = resolve_settings(config_file=FIXTURE, environ={})
    warned = " ".join(str(w.message) for w in caught)
    assert "dataloader_num_workers" in warned and "report_to" in warned
    raw = yaml.safe_load(FIXTURE.read_text())
    assert s.model.hidden_size == raw["hidden_size"] == 768
    assert s.model.num_attention_heads == raw["num_heads"]
    assert s.model.intermediate_size == raw["intermediate_size"]
    assert s.model.max_position_embeddings == raw["max_position_embeddings"]
    assert s.model.vocab_size == raw["vocab_size"]
    assert s.solver.max_steps == raw["num_fixed_point_iterations"]
    assert s.solver.tol == float(raw["fixed_point_tol"])
    assert (s.solver.solver, s.solver.adjoint, s.solver.beta) == ("reversible", "reversible", raw["beta"])
    assert s.train.epochs == raw["num_epochs"] and s.train.max_steps is None  # epochs alone end the run
    assert (s.train.batch_size, s.train.grad_accum) == (raw["batch_size"], raw["gradient_accumulation_steps"])
    assert (s.train.lr, s.train.weight_decay, s.train.warmup_steps) == (
        raw["learning_rate"], raw["weight_decay"], raw["warmup_steps"])
    assert (s.log.log_every, s.train.save_every, s.train.keep_last) == (
        raw["logging_steps"], raw["save_steps"], raw["save_total_limit"])
    assert s.train.precision == "fp16" and s.data.tokenizer == "gpt2"


def test_use_reversible_false_maps_to_the_relaxed_unrolled_baseline(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("use_reversible: false\nbeta: 0.9\nbf16: true\nfp16: false\n")
    s = resolve_settings(config_file=cfg, environ={})
    assert (s.solver.solver, s.solver.adjoint, s.train.precision) == ("relaxed", "unrolled", "bf16")


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"sets": ["solver.beta=1"]}, "solver.beta", "must not be 1"),
        ({"sets": ["solver.beta=2.5"]}, "solver.beta", "less than 2"),
        ({"flags": {"train.lr": 0.0}}, "train.lr", "greater than 0"),
        ({"environ": {"REVDEQ_TRAIN__LR": "-3"}}, "train.lr", "REVDEQ_TRAIN__LR"),
        ({"sets": ["model.num_attention_heads=3"]}, "model.num_attention_heads", "do not divide"),
        ({"sets": ["data.seq_len=4096"]}, "data.seq_len", "max_position_embeddings"),
        ({"sets": ["train.lrate=1"]}, "train.lrate", "did you mean train.lr"),
        ({"sets": ["training.lr=1"]}, "training.lr", "unknown setting"),
        ({"environ": {"REVDEQ_TRAIN__BATCH_SIZE": "many"}}, "train.batch_size", "valid integer"),
        ({"sets": ["solver.solver=newton"]}, "solver.solver", "reversible"),
        ({"sets": ["solver.solver=anderson", "solver.adjoint=reversible"]}, "solver.adjoint", "reversible"),
        ({"sets": ["train.precision=fp8"]}, "train.precision", "fp16"),
        ({"sets": ["train.device=tpu"]}, "train.device", "unknown device"),
        ({"sets": ["model.preset=huge"]}, "model.preset", "tiny"),
        ({"sets": ["noequals"]}, "--set", "KEY=VALUE"),
    ],
)
def test_impossible_values_fail_naming_the_field(kwargs, field, reason):
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as err:
        resolve_settings(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field) and reason in msg and "\n" not in msg, msg


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        resolve_settings(config_file=bad, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_settings(config_file=tmp_path / "missing.yaml", environ={})
    both = tmp_path / "both.yaml"
    both.write_text("fp16: true\nbf16: true\n")
    with pytest.raises(ConfigError, match="fp16/bf16"):
        resolve_settings(config_file=both, environ={})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("hidden_sise: 3\n")
    with pytest.raises(ConfigError, match=r"hidden_sise: unknown setting \(from --config .*unknown.yaml\)"):
        resolve_settings(config_file=unknown, environ={})


def test_resolved_settings_round_trip_through_yaml_and_model_overrides():
    s = resolve_settings(sets=["solver.tol=0", "model.hidden_size=64"], environ={})
    assert settings_from_dict(yaml.safe_load(s.to_yaml()), "x") == s
    kw = s.model_config_overrides()
    assert kw["hidden_size"] == 64 and kw["tol"] is None  # tol 0 = "never stop early" = the model's None
    assert "preset" not in kw and "vocab_size" not in kw

    from revdeq_cli.model import RevDEQConfig

    cfg = RevDEQConfig.from_preset(s.model.preset, vocab_size=257, **kw)
    assert cfg.hidden_size == 64 and cfg.tol is None


def test_resume_base_layer_sits_beneath_the_users_layers():
    stored = resolve_settings(sets=["train.lr=0.05", "model.hidden_size=64"], environ={}).model_dump()
    s = resolve_settings(base=stored, flags={"train.max_steps": 70}, environ={})
    assert (s.train.lr, s.model.hidden_size, s.train.max_steps) == (0.05, 64, 70)


# --------------------------------------------------------------------------- through the CLI (in process)
def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_print_config_prints_the_resolved_yaml_and_exits(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REVDEQ_SOLVER__BETA", "0.8")
    code, out, err = _cli(["--print-config", "--lr", "0.01", "--set", "train.weight_decay=0.05",
                           "--solver-steps", "6"], capsys)
    assert code == 0, err
    s = Settings.model_validate(yaml.safe_load(out))
    assert (s.train.lr, s.train.weight_decay, s.solver.max_steps, s.solver.beta) == (0.01, 0.05, 6, 0.8)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--lr", "-1"], "train.lr"),
        (["--beta", "1"], "solver.beta"),
        (["--set", "model.num_attention_heads=5"], "model.num_attention_heads"),
        (["--set", "train.nope=1"], "train.nope"),
        (["--precision", "fp64"], "train.precision"),
    ],
)
def test_cli_validation_errors_exit_2_with_one_line(argv, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli([*argv, "--print-config"], capsys)
    assert code == 2
    assert err.startswith("revdeq: error: ") and err.count("\n") == 1 and needle in err
    assert "Traceback" not in err and out == ""


@needs_fixture
def test_cli_warns_once_about_ignored_earlier_port_keys(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["--config", str(FIXTURE), "--print-config"], capsys)
    assert code == 0
    assert err.count("revdeq: warning: dataloader_num_workers") == 1 and "report_to" in err


# --------------------------------------------------------------------------- defaults that follow other settings
@pytest.mark.parametrize(("max_steps", "warmup"), [(3, 0), (6, 1), (300, 30), (10**6, 1000)])
def test_an_unset_warmup_follows_max_steps(max_steps, warmup):
    from revdeq_cli.settings import WARMUP_MAX_STEPS, auto_warmup_steps

    s = resolve_settings(flags={"train.max_steps": max_steps}, environ={})
    assert s.train.warmup_steps == warmup == auto_warmup_steps(max_steps) <= max_steps
    assert auto_warmup_steps(10**9) == WARMUP_MAX_STEPS


def test_warmup_auto_is_left_to_the_trainer_when_epochs_or_tokens_may_end_the_run():
    assert resolve_settings(flags={"train.epochs": 2.0}, environ={}).train.warmup_steps is None
    both = resolve_settings(flags={"train.max_steps": 50, "train.max_tokens": 4096}, environ={})
    assert both.train.warmup_steps is None  # the run may end before max_steps: resolved on the real length
    assert resolve_settings(sets=["train.warmup_steps=auto"], flags={"train.max_steps": 40},
                            environ={}).train.warmup_steps == 4


def test_a_given_warmup_is_still_checked_but_a_resumed_runs_own_is_kept():
    with pytest.raises(ConfigError, match=r"^train\.warmup_steps: 30 is more than train\.max_steps 6.*--set"):
        resolve_settings(sets=["train.warmup_steps=30"], flags={"train.max_steps": 6}, environ={})
    stored = resolve_settings(flags={"train.max_steps": 300}, environ={}).model_dump()  # warmup 30
    assert stored["train"]["warmup_steps"] == 30
    resumed = resolve_settings(base=stored, base_source="the settings of ckpt", flags={"train.max_steps": 10},
                               environ={})
    assert (resumed.train.warmup_steps, resumed.train.max_steps) == (30, 10)  # the run keeps its warmup
    with pytest.raises(ConfigError, match="train.warmup_steps: 20 is more"):
        resolve_settings(base=stored, base_source="the settings of ckpt", sets=["train.warmup_steps=20"],
                         flags={"train.max_steps": 10}, environ={})


@pytest.mark.parametrize(("solver", "adjoint"), [("reversible", "reversible"), ("picard", "unrolled"),
                                                 ("relaxed", "unrolled"), ("anderson", "implicit"),
                                                 ("broyden", "implicit"), ("explicit", None)])
@pytest.mark.parametrize("layer", ["flag", "set", "yaml", "env"])
def test_an_unset_adjoint_follows_the_solver_from_every_layer(solver, adjoint, layer, tmp_path):
    kwargs: dict = {"environ": {}}
    if layer == "flag":
        kwargs["flags"] = {"solver.solver": solver}
    elif layer == "set":
        kwargs["sets"] = [f"solver.solver={solver}"]
    elif layer == "yaml":
        (tmp_path / "c.yaml").write_text(f"solver:\n  solver: {solver}\n")
        kwargs["config_file"] = tmp_path / "c.yaml"
    else:
        kwargs["environ"] = {"REVDEQ_SOLVER__SOLVER": solver}
    s = resolve_settings(**kwargs)
    assert (s.solver.solver, s.solver.adjoint) == (solver, adjoint)


def test_a_given_adjoint_is_kept_and_checked_and_null_means_unset():
    s = resolve_settings(flags={"solver.solver": "anderson", "solver.adjoint": "phantom"}, environ={})
    assert s.solver.adjoint == "phantom"
    with pytest.raises(ConfigError, match=r"solver.adjoint: 'reversible' needs .* use --adjoint implicit"):
        resolve_settings(flags={"solver.solver": "anderson", "solver.adjoint": "reversible"}, environ={})
    assert resolve_settings(sets=["solver.adjoint=null"], environ={}).solver.adjoint == "reversible"  # preset's


def test_a_resumed_runs_adjoint_counts_as_given():
    stored = resolve_settings(environ={}).model_dump()  # reversible / reversible
    with pytest.raises(ConfigError) as err:
        resolve_settings(base=stored, base_source="the settings of runs/x/checkpoint-000006",
                         flags={"solver.solver": "anderson"}, environ={})
    msg = str(err.value)
    assert "--adjoint implicit" in msg and "runs/x/checkpoint-000006" in msg and "\n" not in msg
    assert "drop --adjoint" not in msg  # the stored adjoint is kept whether or not --adjoint is dropped
    ok = resolve_settings(base=stored, flags={"solver.solver": "anderson", "solver.adjoint": "implicit"},
                          environ={})
    assert (ok.solver.solver, ok.solver.adjoint) == ("anderson", "implicit")
    picard = resolve_settings(flags={"solver.solver": "picard"}, environ={}).model_dump()
    assert resolve_settings(base=picard, environ={}).solver.adjoint == "unrolled"
    explicit = resolve_settings(flags={"solver.solver": "explicit"}, environ={}).model_dump()
    again = resolve_settings(base=explicit, environ={})
    assert (again.solver.solver, again.solver.adjoint) == ("explicit", None)


def test_an_unset_seq_len_is_the_models_context():
    default = resolve_settings(environ={})
    assert default.data.seq_len == default.model.max_position_embeddings == 128
    s = resolve_settings(sets=["model.max_position_embeddings=64"], environ={})
    assert s.data.seq_len == 64
    small = resolve_settings(flags={"model.preset": "small"}, environ={})
    assert small.data.seq_len == small.model.max_position_embeddings == 512
    with pytest.raises(ConfigError, match="data.seq_len: 100 is longer"):
        resolve_settings(sets=["model.max_position_embeddings=64", "data.seq_len=100"], environ={})


def test_a_shorter_seq_len_shortens_the_presets_context_but_not_a_given_one():
    s = resolve_settings(flags={"model.preset": "small", "data.seq_len": 64}, environ={})
    assert (s.data.seq_len, s.model.max_position_embeddings) == (64, 64)  # the saved model declares 64
    kept = resolve_settings(flags={"model.preset": "small", "data.seq_len": 64},
                            sets=["model.max_position_embeddings=512"], environ={})
    assert (kept.data.seq_len, kept.model.max_position_embeddings) == (64, 512)
    with pytest.raises(ConfigError, match="data.seq_len: 4096 is longer than model.max_position_embeddings 512"):
        resolve_settings(flags={"model.preset": "small", "data.seq_len": 4096}, environ={})


def test_a_resumed_run_keeps_its_stored_seq_len_and_context():
    # a run made before tiny's context became 128: seq_len 128 on a 256-position model
    stored = resolve_settings(sets=["model.max_position_embeddings=256", "data.seq_len=128"], environ={}).model_dump()
    again = resolve_settings(base=stored, environ={})
    assert (again.data.seq_len, again.model.max_position_embeddings) == (128, 256)
    short = resolve_settings(flags={"data.seq_len": 32}, environ={}).model_dump()
    assert resolve_settings(base=short, environ={}).model.max_position_embeddings == 32


def test_print_config_shows_the_resolved_warmup_and_adjoint(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["--print-config", "--max-steps", "6", "--solver", "anderson"], capsys)
    assert code == 0, err
    s = Settings.model_validate(yaml.safe_load(out))
    assert (s.train.warmup_steps, s.solver.adjoint) == (1, "implicit")


def test_an_unset_lr_follows_the_preset_and_a_given_one_is_kept(tmp_path):
    assert resolve_settings(environ={}).train.lr == 4e-3  # tiny: the equilibrium study's best at 1200 steps
    assert resolve_settings(flags={"model.preset": "small"}, environ={}).train.lr == 2e-3
    assert resolve_settings(flags={"train.lr": 1e-3}, environ={}).train.lr == 1e-3
    assert resolve_settings(sets=["train.lr=5e-4"], environ={}).train.lr == 5e-4
    stored = resolve_settings(flags={"train.lr": 1e-3}, environ={}).model_dump()
    assert resolve_settings(base=stored, environ={}).train.lr == 1e-3  # a resumed run keeps its own


# --------------------------------------------------------------------------- the environment layer (pydantic-settings)
def test_an_env_value_that_fails_validation_names_the_variable(capsys, monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_settings(environ={"REVDEQ_TRAIN__BATCH_SIZE": "0"})
    assert str(err.value).startswith("train.batch_size: ") and "from REVDEQ_TRAIN__BATCH_SIZE" in str(err.value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REVDEQ_TRAIN__LR", "-1")
    code, out, err_text = _cli(["--print-config"], capsys)
    assert code == 2 and out == "" and err_text.count("\n") == 1
    assert err_text.startswith("revdeq: error: train.lr: ") and "REVDEQ_TRAIN__LR" in err_text


def test_env_values_parse_as_yaml_and_other_revdeq_variables_are_not_settings():
    s = resolve_settings(environ={"REVDEQ_TRAIN__LR": "3e-4", "REVDEQ_DATA__OFFLINE": "true",
                                  "REVDEQ_TRAIN__EVAL_BATCHES": "null", "REVDEQ_CACHE_DIR": "/x",
                                  "REVDEQ_STDLIB_DIR": "/y", "REVDEQ_TRAIN": "{lr: 5}", "OTHER__LR": "1"})
    assert (s.train.lr, s.data.offline, s.train.eval_batches) == (3e-4, True, None)
    with pytest.raises(ConfigError, match=r"^train\.seed: .*got \[1, 2\], from REVDEQ_TRAIN__SEED"):
        resolve_settings(environ={"REVDEQ_TRAIN__SEED": "[1, 2]"})


@pytest.mark.parametrize(("name", "needle"), [("REVDEQ_TRAINING__LR", "did you mean train.lr"),
                                              ("REVDEQ_TRAIN__LRATE", "did you mean train.lr"),
                                              ("REVDEQ_TRAIN__LR__X", "train.lr__x: unknown setting")])
def test_an_unknown_env_setting_is_refused_naming_the_variable(name, needle):
    with pytest.raises(ConfigError) as err:
        resolve_settings(environ={name: "1"})
    assert needle in str(err.value) and f"(from {name})" in str(err.value)


def test_the_layers_merge_key_by_key_and_each_key_names_its_layer(tmp_path):
    from revdeq_cli.settings import merge_layers

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: 0.1, seed: 1}\nlearning_rate: 0.15\nsolver.fixed_point_penalty: 3\n")
    merged, sources = merge_layers(config_file=cfg, environ={"REVDEQ_TRAIN__SEED": "2"},
                                   sets=["train.batch_size=3", "train.batch_size=4"], flags={"data.seq_len": 64},
                                   flag_names={"data.seq_len": "--seq-len"}, base={"train": {"grad_accum": 2}})
    assert merged == {"train.lr": 0.15, "train.seed": 2, "objective.fixed_point_penalty": 3, "train.batch_size": 4,
                      "data.seq_len": 64, "train.grad_accum": 2}
    assert sources == {"train.lr": f"--config {cfg}", "train.seed": "REVDEQ_TRAIN__SEED",
                       "objective.fixed_point_penalty": f"--config {cfg}",
                       "train.batch_size": "--set train.batch_size=4", "data.seq_len": "--seq-len",
                       "train.grad_accum": "the resumed checkpoint"}


def test_every_setting_has_a_description_without_a_typed_default():
    from revdeq_cli.settings import SECTIONS, shown_default

    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            assert field.description and "default" not in field.description, f"{section}.{name}"
            shown_default(f"{section}.{name}")  # every field has a rule for what its default reads
