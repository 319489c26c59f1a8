"""`revdeq eval`: perplexity, bits per byte and the solver-steps table, in-process and as a subprocess."""

from __future__ import annotations

import json
import math

import pytest
from cli_helpers import FIXTURES, invoke, one_error_line, run_cli, trained_run, write_revdeq_pytorch_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_eval_matches_the_trainers_validation_loss(trained):
    run, _ = trained
    result = invoke("eval", run, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    [row] = data["results"]
    state = json.loads(invoke("inspect", run, "--json").stdout)["training"]
    # The same split, every target once, the same 8 inference steps (2 + the detached start's mean 6):
    # the trainer's final validation loss (the whole split; best_val_loss is over train.eval_batches prefixes).
    assert row["loss"] == pytest.approx(state["final_val_loss"], abs=1e-5)
    assert row["solver_steps"] == 8 and row["mean_solver_steps"] == 8
    assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    assert row["bits_per_byte"] == pytest.approx(row["nll"] / (math.log(2) * row["bytes"]))
    # byte tokenizer: one token per byte (plus document separators), so bits/byte ~ loss / ln 2
    assert row["bits_per_byte"] == pytest.approx(row["loss"] / math.log(2), rel=0.02)
    assert row["tokens_per_sec"] > 0


def test_solver_steps_table(trained):
    run, _ = trained
    result = invoke("eval", run, "--solver-steps", "1,2", "--solver-steps", "4", "--split", "test")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("solver steps"))
    rows = [line.split() for line in lines[header + 2: header + 5]]
    assert [r[0] for r in rows] == ["1", "2", "4"]
    assert [r[1] for r in rows] == ["-", "-", "-"]  # no tolerance: fixed steps
    assert [r[5] for r in rows] == ["1.00", "2.00", "4.00"]  # mean solver steps taken
    assert [r[6] for r in rows] == ["1", "2", "4"]  # max
    residuals = [float(r[7]) for r in rows]
    assert residuals[0] > residuals[1] > residuals[2]  # more steps, closer to the fixed point
    assert "test split" in result.stdout and "trained with max_steps 2" in result.stdout


def test_tol_sweeps_adaptive_depth_and_reports_mean_steps_per_token(trained):
    """Each --tol row stops every position at its own residual: a looser tolerance, fewer steps per token
    on average; 'none' runs the fixed count. JSON rows carry mean_solver_steps (over tokens) and the tol."""
    run, _ = trained
    fixed = json.loads(invoke("eval", run, "--solver-steps", "16", "--json").stdout)["results"][0]
    result = invoke("eval", run, "--solver-steps", "16", "--tol", "0.5,0.2", "--tol", "none", "--json")
    assert result.exit_code == 0, result.output
    loose, tight, none = json.loads(result.stdout)["results"]
    assert (loose["tol"], tight["tol"], none["tol"]) == (0.5, 0.2, None)
    assert loose["solver_steps"] == tight["solver_steps"] == 16
    assert 1 <= loose["mean_solver_steps"] < tight["mean_solver_steps"] <= 16
    assert loose["max_solver_steps"] <= tight["max_solver_steps"] <= 16
    assert none["mean_solver_steps"] == none["max_solver_steps"] == 16
    assert none["loss"] == pytest.approx(fixed["loss"], abs=1e-6)
    table = invoke("eval", run, "--solver-steps", "16", "--tol", "0.5").stdout
    [row] = [line.split() for line in table.splitlines() if line.split()[:2] == ["16", "0.5"]]
    assert float(row[5]) == pytest.approx(loose["mean_solver_steps"], abs=0.01)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", ","])
def test_a_bad_tol_is_one_line_exit_2(trained, value):
    run, _ = trained
    result = invoke("eval", run, "--tol", value)
    assert result.exit_code == 2
    one_error_line(result.stderr, "--tol")


def test_dataset_override_and_max_batches(trained, tmp_path):
    run, corpus = trained
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "validation", "test"):
        (other / f"{split}.txt").write_text((corpus / "validation.txt").read_text())
    result = invoke("eval", run, "--dataset", other, "--max-batches", "1", "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["results"]
    assert row["tokens"] == 2 * 32


def test_converted_model_without_tokenizer_is_refused(tmp_path):
    if not (FIXTURES / "model.pt").is_file():
        pytest.skip(f"fixture {FIXTURES} absent")
    assert invoke("convert", FIXTURES / "model.pt", tmp_path / "m").exit_code == 0
    result = invoke("eval", tmp_path / "m")
    assert result.exit_code == 2
    one_error_line(result.stderr, "tokenizer")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--solver-steps", "two"], "--solver-steps"),
        (["--solver-steps", "-1"], "--solver-steps"),
        (["--seq-len", "100000"], "--seq-len"),
    ],
)
def test_bad_options(trained, args, fragment):
    result = invoke("eval", trained[0], *args)
    assert result.exit_code == 2
    one_error_line(result.stderr, fragment)


def test_bad_paths(tmp_path):
    result = invoke("eval", tmp_path / "missing")
    assert result.exit_code == 2
    one_error_line(result.stderr, str(tmp_path / "missing"))
    (tmp_path / "empty-run").mkdir()
    result = invoke("eval", tmp_path / "empty-run")
    assert result.exit_code == 2
    one_error_line(result.stderr, "no checkpoint")


def test_subprocess(trained, tmp_path):
    run, _ = trained
    ok = run_cli("eval", run, "--solver-steps", "1,3", "--json")
    assert ok.returncode == 0, ok.stderr
    assert [r["solver_steps"] for r in json.loads(ok.stdout)["results"]] == [1, 3]
    bad = run_cli("eval", tmp_path / "missing")
    assert bad.returncode == 2
    one_error_line(bad.stderr, "missing")


def test_the_default_window_is_the_trained_context(trained, tmp_path):
    run, corpus = trained
    data = json.loads(invoke("eval", run, "--json", "--max-batches", "1").stdout)
    assert data["seq_len"] == 32  # the run's seq_len, which its model declares
    # A model without training settings (the earlier port's file, converted): its declared context, even
    # past 256 positions.
    write_revdeq_pytorch_model(tmp_path / "model.pt", vocab_size=257, positions=300)
    assert invoke("convert", tmp_path / "model.pt", tmp_path / "ported", "--tokenizer", "byte").exit_code == 0
    ported = invoke("eval", tmp_path / "ported", "--dataset", corpus, "--json", "--max-batches", "1",
                    "--batch-size", "2")
    assert ported.exit_code == 0, ported.output
    assert json.loads(ported.stdout)["seq_len"] == 300
    too_long = invoke("eval", tmp_path / "ported", "--dataset", corpus, "--seq-len", "301")
    assert too_long.exit_code == 2
    one_error_line(too_long.stderr, "--seq-len 301", "300 positions")
