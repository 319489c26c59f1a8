"""A model directory written by revdeq 0.1 (before the training objective left `RevDEQConfig`; tests/data/README.md)
loads, maps its removed fields once, and evaluates to the losses that version gave."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import REPO, invoke, small_corpus

from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model.config import LEGACY_FIELDS

OLD = REPO / "tests" / "data" / "checkpoint-v0.1"
EXPECTED = json.loads((REPO / "tests" / "data" / "checkpoint-v0.1.json").read_text())


def test_the_old_config_maps_its_removed_fields_once():
    stored = json.loads((OLD / "config.json").read_text())
    assert {"train_detached_steps", "fixed_point_penalty", "output_init_scale"} <= set(stored)  # an old file
    config = RevDEQConfig.from_pretrained(OLD)
    # its eval mode ran the depth it trained at: 2 differentiated + the graph-free start's mean 6
    assert stored["inference_max_steps"] is None and config.inference_max_steps == 8
    assert not set(LEGACY_FIELDS) & set(config.to_dict())
    assert (config.init_state, config.block_skip, config.inference_readout) == ("input", "input", "midpoint")


def test_the_old_checkpoint_evaluates_to_the_same_losses(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    result = invoke("eval", OLD, "--dataset", corpus, "--json", "--solver-steps", "1,8")
    assert result.exit_code == 0, result.output
    got = {r["solver_steps"]: r["loss"] for r in json.loads(result.stdout)["results"]}
    for row in EXPECTED["results"]:
        assert got[row["solver_steps"]] == pytest.approx(row["loss"], rel=1e-6), row
    default = json.loads(invoke("eval", OLD, "--dataset", corpus, "--json").stdout)["results"][0]
    assert default["solver_steps"] == 8 and default["loss"] == pytest.approx(EXPECTED["results"][1]["loss"], rel=1e-6)


def test_resaved_it_holds_no_removed_field(tmp_path):
    model = RevDEQForCausalLM.from_pretrained(OLD)
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert not set(LEGACY_FIELDS) & set(saved) and saved["inference_max_steps"] == 8


@pytest.mark.parametrize("field, value, mapped", [
    ("anderson_m", 3, ("solver_options", {"m": 3})),
    ("implicit_max_steps", 7, ("adjoint_options", {"max_steps": 7})),
])
def test_old_baseline_solver_settings_move_to_the_options(tmp_path, field, value, mapped):
    shutil.copytree(OLD, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config.update({"solver": "anderson", "adjoint": "implicit", field: value})
    path.write_text(json.dumps(config))
    loaded = RevDEQConfig.from_pretrained(tmp_path / "m")
    assert getattr(loaded, mapped[0]) == mapped[1]


def test_an_old_config_with_a_removed_architecture_option_is_refused_naming_it(tmp_path):
    shutil.copytree(OLD, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "block_output_norm": True}))
    with pytest.raises(ConfigError, match="^block_output_norm: True is no longer supported"):
        RevDEQConfig.from_pretrained(tmp_path / "m")
    result = invoke("eval", tmp_path / "m")
    assert result.exit_code == 2 and "block_output_norm" in result.stderr
