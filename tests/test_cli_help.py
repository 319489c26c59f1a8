"""Every command has --help with examples; `revdeq --version`; help needs no heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_helpers import invoke, run_cli

from revdeq_cli import __version__

COMMANDS = ["generate", "eval", "inspect", "convert"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command):
    result = invoke(command, "--help", env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout and f"revdeq {command} " in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"revdeq {__version__}"
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"revdeq {__version__}"


def test_command_modules_import_nothing_heavy():
    code = ("import sys, revdeq_cli.cli.app as a; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_usage_errors_exit_2():
    result = invoke("convert", "only-one-argument")
    assert result.exit_code == 2
    result = invoke("eval", "x", "--split", "training")
    assert result.exit_code == 2
