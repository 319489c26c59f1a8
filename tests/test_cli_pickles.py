"""A hostile pickle where a training state is expected is refused by every command that reads one, and
never runs: `train --resume`, `generate`, `eval` (and `inspect`, `convert`: see their test files)."""

from __future__ import annotations

import shutil

import pytest
import torch
from cli_helpers import Hostile, invoke, one_error_line, run_cli, trained_run


@pytest.fixture
def hostile_run(tmp_path_factory, tmp_path):
    """A copy of the session's run whose newest checkpoint's training_state.pt would `touch` a marker."""
    run, _ = trained_run(tmp_path_factory)
    copy = shutil.copytree(run, tmp_path / "run", symlinks=True)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "optimizer": Hostile(marker)}, copy / "checkpoint-000002" / "training_state.pt")
    return copy, marker


@pytest.mark.parametrize("command", [["generate", "x", "--max-new-tokens", "2", "-c"], ["eval"]])
def test_generate_and_eval_refuse(hostile_run, command):
    run, marker = hostile_run
    result = invoke(*command, run)
    assert result.exit_code == 2
    one_error_line(result.stderr, "checkpoint-000002", "training_state.pt")
    assert not marker.exists()


def test_train_resume_refuses(hostile_run):
    run, marker = hostile_run
    proc = run_cli("train", "--resume", run / "checkpoint-000002", "--out-dir", run, "--max-steps", "3",
                   "--progress", "plain")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    one_error_line(proc.stderr, "training_state.pt")
    assert not marker.exists()
