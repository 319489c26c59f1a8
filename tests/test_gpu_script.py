"""`benchmarks/gpu.sh --smoke` runs the GPU script's steps on the CPU at the tiny width, so the script cannot rot
while no GPU is lent: every step runs to its end and the training-speed table has a row per model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_its_steps_on_the_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--smoke", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "train-speed-smoke.txt").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["revdeq-paper", "revdeq-equilibrium", "revdeq-unrolled", "transformer-12"], table
    assert "cached and uncached tokens identical: True" in (tmp_path / "generation-smoke.txt").read_text()
    assert "reversible peak memory" in (tmp_path / "solver-memory-smoke.txt").read_text()
