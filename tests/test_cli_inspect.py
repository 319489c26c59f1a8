"""`revdeq inspect`: in-process (CliRunner) and as a subprocess, with its error paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import Hostile, invoke, one_error_line, run_cli, trained_run
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


@pytest.fixture
def checkpoint_copy(run, tmp_path):
    """A private copy of the newest checkpoint, for tests that damage it."""
    return shutil.copytree(run / "checkpoint-000002", tmp_path / "checkpoint-000002")


def test_inspect_run_dir_shows_the_newest_checkpoint(run):
    from revdeq_cli.model import RevDEQForCausalLM

    result = invoke("inspect", run)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "checkpoint-000002" in out and "step 2 / 2" in out and "tokens seen 256" in out
    counts = RevDEQForCausalLM.from_pretrained(run / "checkpoint-000002").num_parameters_split()
    assert (f"{counts['total']:,} total | {counts['embedding']:,} embedding | "
            f"{counts['non_embedding']:,} non-embedding") in out
    assert "float32" in out and "train/loss" in out and "val/loss" in out
    assert "training_state.pt" in out and "model.safetensors" in out


def test_inspect_json_and_weights(run):
    result = invoke("inspect", run / "checkpoint-000001", "--weights", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["training"]["step"] == 1 and data["config"]["model_type"] == "revdeq"
    assert data["settings"]["data"]["seq_len"] == 32
    names = {w["name"]: w for w in data["weights"]}
    assert names["wte.weight"]["shape"] == [data["config"]["vocab_size"], 32]
    assert names["blocks.0.attn.c_attn.weight"] == {"name": "blocks.0.attn.c_attn.weight", "shape": [96, 32],
                                                    "dtype": "float32", "bytes": 96 * 32 * 4}
    assert sum(w["bytes"] for w in data["weights"]) // 4 == data["parameters"]["total"]
    assert [p[0] for p in data["recent"]["train/loss"]] == [1]  # only steps up to this checkpoint's


def test_inspect_weights_of_a_safetensors_file(run):
    result = invoke("inspect", run / "final" / "model.safetensors", "--weights")
    assert result.exit_code == 0, result.output
    assert "blocks.0.mlp.c_fc.weight" in result.stdout and "64x32" in result.stdout


def test_probe_shows_the_residual_per_solver_step(run):
    result = invoke("inspect", run, "--probe", "--probe-steps", "5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    probe, context = data["probe"], data["config"]["max_position_embeddings"]
    residuals, positions = probe["residuals"], probe["position_residuals"]
    assert len(residuals) == 5 and all(r > 0 for r in residuals)
    assert residuals[-1] < residuals[0]  # the iteration contracts
    # one residual per position of the probe text after the last step; the window's residual is a mean of
    # theirs (weighted by ||f(z)_t||^2), so it lies between the smallest and the largest
    # (the byte tokenizer: a token a byte, the text cut to the model's context)
    assert len(positions) == min(len(probe["text"].encode()), context) and all(r >= 0 for r in positions)
    assert min(positions) * (1 - 1e-4) <= residuals[-1] <= max(positions) * (1 + 1e-4)
    text = invoke("inspect", run, "--probe", "--probe-steps", "3").stdout
    assert "residual" in text and "#" in text
    assert "positions after 3 steps: median" in text and "least settled: " in text


def test_inspect_shows_how_the_model_runs_and_how_the_run_trained_it_and_probes_past_it(run, tmp_path):
    out = invoke("inspect", run).stdout
    assert ("block        skip input, start z0 = x; inference 8 steps, read at the pair's midpoint (y + z) / 2"
            in out)  # the equilibrium recipe's, at the depth it trained
    assert ("objective    recipe equilibrium: 2 differentiated after poisson-lognormal:6:24 graph-free solver steps "
            "per batch, fixed point penalty 2 over the worst 10% of positions (by residual), ramped in over the "
            "first 20% of steps, + 1 x the cross-entropy read one step on, at f(z_N)") in out
    # a shared model directory (no training state) says how it runs, and nothing of how it was trained
    shutil.copytree(run / "final", tmp_path / "shared", ignore=shutil.ignore_patterns("training_state.pt"))
    shared = invoke("inspect", tmp_path / "shared").stdout
    assert "block        skip input" in shared and "objective" not in shared
    result = invoke("inspect", run, "--probe", "--steps", "32", "--json")  # past the 2 steps it trained with
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["probe"]["residuals"]) == 32


# ------------------------------------------------------------------------------------------ error paths
def test_probe_with_a_tolerance_shows_when_each_token_stops(run):
    result = invoke("inspect", run, "--probe", "--steps", "16", "--tol", "0.2", "--json")
    assert result.exit_code == 0, result.output
    probe = json.loads(result.stdout)["probe"]
    stops, residuals = probe["stopping_steps"], probe["residuals"]
    assert probe["tol"] == 0.2 and len(residuals) == 16
    assert all(1 <= k <= 16 for k in stops) and len(set(stops)) > 1  # tokens stop at different steps
    text = invoke("inspect", run, "--probe", "--steps", "16", "--tol", "0.2").stdout
    assert f"adaptive depth at tol 0.2: {len(stops)} tokens, mean {sum(stops) / len(stops):.2f} steps" in text
    counts = {int(line.split()[0]): int(line.split()[1]) for line in text.split("tokens stopping at each step")[1]
              .splitlines() if line.split() and line.split()[0].isdigit()}
    assert counts == {k: stops.count(k) for k in set(stops)}
    refused = invoke("inspect", run, "--tol", "0.3")
    assert refused.exit_code == 2 and "--probe" in refused.stderr


def test_missing_path(tmp_path):
    result = invoke("inspect", tmp_path / "nope")
    assert result.exit_code == 2
    one_error_line(result.stderr, str(tmp_path / "nope"))


def test_run_dir_without_checkpoints(tmp_path):
    (tmp_path / "logs").mkdir()
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 2
    one_error_line(result.stderr, str(tmp_path), "no checkpoint")


def test_truncated_weights(checkpoint_copy):
    weights = checkpoint_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = invoke("inspect", checkpoint_copy)
    assert result.exit_code == 2
    one_error_line(result.stderr, str(weights))


def test_safetensors_that_is_not_ours(checkpoint_copy):
    weights = checkpoint_copy / "model.safetensors"
    save_file({"transformer.h.0.attn.weight": torch.zeros(4, 4)}, str(weights))
    result = invoke("inspect", checkpoint_copy)
    assert result.exit_code == 2
    one_error_line(result.stderr, str(weights), "not a revdeq model")


def test_config_of_another_model(checkpoint_copy):
    config = checkpoint_copy / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt2"}))
    result = invoke("inspect", checkpoint_copy)
    assert result.exit_code == 2
    one_error_line(result.stderr, str(config), "'gpt2'")


def test_corrupt_config(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{not json")
    result = invoke("inspect", checkpoint_copy)
    assert result.exit_code == 2
    one_error_line(result.stderr, "config.json", "not valid JSON")


def _plant_hostile_state(checkpoint, tmp_path):
    """Replace training_state.pt by a pickle that would create a marker file if it were ever run."""
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": Hostile(marker)}, checkpoint / "training_state.pt")
    return marker


def test_malicious_training_state_is_refused_without_running(checkpoint_copy, tmp_path):
    marker = _plant_hostile_state(checkpoint_copy, tmp_path)
    result = invoke("inspect", checkpoint_copy)
    assert result.exit_code == 2
    one_error_line(result.stderr, "training_state.pt")
    assert not marker.exists()


def test_subprocess(run, checkpoint_copy, tmp_path):
    ok = run_cli("inspect", run, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["training"]["step"] == 2
    marker = _plant_hostile_state(checkpoint_copy, tmp_path)
    bad = run_cli("inspect", checkpoint_copy)
    assert bad.returncode == 2
    one_error_line(bad.stderr, "training_state.pt")
    assert not marker.exists()


