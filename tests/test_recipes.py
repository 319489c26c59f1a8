"""Recipes by name: `--recipe paper` is the reference implementation's method (held against docs/recipes.md's
table), `--recipe equilibrium` is revdeq's; presets are sizes only; the objective's settings stay with the run."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from cli_helpers import REPO, TINY_TRAIN, invoke, small_corpus

from revdeq_cli.recipes import RECIPES, model_overrides
from revdeq_cli.settings import resolve_settings


def _table_rows() -> list[tuple[str, str, str]]:
    """(setting, revdeq key, value) of docs/recipes.md's `paper` table, for the rows with a revdeq key."""
    text = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("## paper", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z_]+\.[a-z_0-9]+`", cells[1]):
            rows.append((cells[0], cells[1].strip("`"), cells[2].strip("`")))
    return rows


def _value(text: str):
    """A table cell as the setting's value: YAML (true, 0.5, zeros), with numbers such as 1e-08 as floats."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def test_the_paper_recipe_is_the_table_in_the_docs():
    rows = _table_rows()
    assert len(rows) >= 20  # the table was read, not skipped
    result = invoke("train", "--preset", "paper", "--recipe", "paper", "--print-config")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    for setting, key, value in rows:
        section, field = key.split(".")
        assert field in shown[section], f"{setting}: {key} is not a setting"
        # a rule such as detached_steps is text ("0"); the rest read as YAML values
        assert shown[section][field] in (_value(value), value), \
            f"{setting}: {key} is {shown[section][field]!r}, the docs say {value}"
    keys = {key for _, key, _ in rows}
    # every setting the recipe sets is in the table
    assert set(RECIPES["paper"]) - keys <= {"train.plateau_patience"}, set(RECIPES["paper"]) - keys


def test_presets_are_sizes_and_the_recipe_is_chosen_apart():
    tiny_paper = resolve_settings(flags={"train.recipe": "paper"})
    tiny_ours = resolve_settings()
    assert tiny_ours.train.recipe == "equilibrium"  # the default
    assert tiny_paper.model.hidden_size == tiny_ours.model.hidden_size == 128
    assert (tiny_paper.model.init_state, tiny_paper.model.block_skip) == ("zeros", "state")
    assert (tiny_ours.model.init_state, tiny_ours.model.block_skip) == ("input", "input")
    assert tiny_paper.solver.max_steps == 4 and tiny_ours.solver.max_steps == 2
    assert tiny_paper.objective.fixed_point_penalty == 0 and tiny_paper.objective.detached_steps == "0"
    assert tiny_ours.objective.fixed_point_penalty == 2.0
    assert (tiny_paper.train.lr, tiny_paper.train.schedule, tiny_paper.train.batch_size) == (3e-4, "plateau", 32)
    assert tiny_ours.train.lr == 4e-3
    # a layer above the recipe wins, and says where it came from when it is bad
    assert resolve_settings(flags={"train.recipe": "paper", "train.lr": 1e-3}).train.lr == 1e-3
    assert model_overrides("equilibrium", "tiny")["inference_readout"] == "midpoint"


def test_an_unknown_recipe_is_one_line_naming_the_flag():
    result = invoke("train", "--recipe", "papr", "--print-config")
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("revdeq: error: train.recipe:") and "--recipe" in line and "paper" in line


@pytest.mark.parametrize("recipe", ["paper", "equilibrium"])
def test_a_three_step_run_of_each_recipe_trains_evaluates_and_keeps_its_objective_in_the_run(tmp_path, recipe):
    corpus = small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    # TINY_TRAIN's sizes and cadence, without its --solver-steps (the recipe's own depth) or --max-steps
    flags = list(TINY_TRAIN)
    for option in ("--solver-steps", "--max-steps"):
        i = flags.index(option)
        del flags[i:i + 2]
    result = invoke("train", "--dataset", corpus, "--out-dir", run, "--set", f"data.cache_dir={tmp_path / 'cache'}",
                    "--recipe", recipe, "--max-steps", "3", *flags)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "final" / "config.json").read_text())
    objective_fields = {"detached_steps", "fixed_point_penalty", "penalty_tail", "penalty_ramp", "next_iterate_loss",
                        "train_detached_steps", "fixed_point_penalty_tail", "train_steps"}
    assert not objective_fields & set(config)  # a shared model carries no training objective
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["train"]["recipe"] == recipe and "objective" in stored
    want_depth = 4 if recipe == "paper" else 2 + 6  # the trained depth: differentiated + the graph-free mean
    assert config["inference_max_steps"] == want_depth
    assert config["init_state"] == ("zeros" if recipe == "paper" else "input")
    shown = invoke("inspect", run).stdout
    assert f"objective    recipe {recipe}:" in shown
    evaluated = invoke("eval", run, "--json", "--solver-steps", "1,16")
    assert evaluated.exit_code == 0, evaluated.output
    assert [r["solver_steps"] for r in json.loads(evaluated.stdout)["results"]] == [1, 16]
