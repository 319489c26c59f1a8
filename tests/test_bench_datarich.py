"""benchmarks/datarich.py: its --smoke runs the whole protocol (screen, confirm, equal time, report) on a fake
standard library, appends every run to the runs file, continues a stopped study, and rebuilds its report from that
file alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODELS = ["revdeq-paper", "revdeq-equilibrium", "deq-implicit", "transformer-1", "transformer-deep",
          "transformer-deep-narrow"]
KEYS = {"model", "params", "val_ppl_equal_tokens", "val_ppl_equal_time", "tokens", "seconds", "peak_mib",
        "train_fwd_evals_per_token", "train_bwd_evals_per_token", "inference_evals_per_token", "inference_sweep",
        "curve", "best_lr"}


def _datarich(*argv: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / "datarich.py"), *argv], capture_output=True, text=True,
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_datarich_smoke_runs_the_protocol_and_rebuilds_its_report(tmp_path):
    out = tmp_path / "study"
    printed = _datarich("--smoke", "--out-dir", str(out))
    runs_file = out / "datarich-runs.jsonl"
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
    # 6 models x 2 lrs screened; 6 confirmed at seed 0 and the top 2 (+ the best RevDEQ) at seed 1; 5 at equal time
    stages = [r["stage"] for r in runs]
    assert stages.count("screen") == 12 and stages.count("equal-time") == 5
    assert 8 <= stages.count("confirm") <= 9
    assert all(r["cpu"] and r["command"].startswith("python benchmarks/datarich.py --smoke") for r in runs)

    records = json.loads((out / "datarich.json").read_text())
    assert [r["model"] for r in records] == MODELS
    for r in records:
        assert KEYS <= r.keys(), r["model"]
        assert r["params"] > 0 and r["val_ppl_equal_tokens"] > 1 and r["val_ppl_equal_time"] > 1
        assert r["tokens"] == 5 * 4 * 32 and r["seconds"] > 0
        assert r["peak_mib"] is not None  # the confirm runs are fresh processes
    by_model = {r["model"]: r for r in records}
    assert [x["steps"] for x in by_model["revdeq-equilibrium"]["inference_sweep"]] == [1, 2, 4, 8, 16, 32, 64]
    assert by_model["transformer-1"]["inference_sweep"] == []
    assert by_model["transformer-deep"]["layers"] == 17  # 1 + 2 x (2 differentiated + 6 graph-free steps)
    assert by_model["transformer-deep-narrow"]["hidden_size"] < 32
    assert by_model["revdeq-paper"]["train_fwd_evals_per_token"] == 9  # z0 + 2 per step, 4 steps

    table = (out / "datarich.md").read_text()
    assert records[0]["cpu"][0] in table and "- CPU: " in table
    assert "## Screen" in table and "## Equal training tokens" in table and "## Equal training time" in table
    assert "- Goal, equal tokens:" in table and ("**met**" in table or "**not met**" in table)
    assert "the RevDEQ's best recipe" in table
    assert "| `transformer-deep` |" in printed

    # a stopped study continues: the missing run is run again and appended, nothing else
    lines = runs_file.read_text().splitlines()
    runs_file.write_text("\n".join(lines[:-1]) + "\n")
    _datarich("equal-time", "--smoke", "--out-dir", str(out))
    assert runs_file.read_text().splitlines()[:-1] == lines[:-1]
    assert len(runs_file.read_text().splitlines()) == len(lines)

    # the report is rebuilt from the runs file alone, to the same files
    saved = {name: (out / name).read_text() for name in ("datarich.md", "datarich.json")}
    for name in saved:
        (out / name).unlink()
    _datarich("report", "--smoke", "--out-dir", str(out))
    assert {name: (out / name).read_text() for name in saved} == saved
    assert len(runs_file.read_text().splitlines()) == len(lines)


def test_a_best_lr_at_the_grids_end_is_screened_further_out(tmp_path):
    """The screen's rule, the same for every model: a best lr at an end of what was screened is screened a
    factor 2 further out until the best is inside, at most --grid-extensions times."""
    sys.path.insert(0, str(BENCH))
    import datarich

    class Screened(datarich.Study):  # perplexity a function of the lr, no training
        def __init__(self, opts, best_at):
            super().__init__(opts, log=lambda _: None)
            self.best_at, self.asked = best_at, []

        def run(self, stage, model, lr, seed, *, steps=None, seconds=None):
            self.asked.append(lr)
            record = {"stage": stage, "model": model, "lr": lr, "seed": seed, "steps": steps,
                      "budget_seconds": seconds, "protocol": self.proto,
                      "result": {"diverged": None, "final_val_ppl": 5 + abs(math.log2(lr / self.best_at))}}
            self.runs.append(record)
            return record

    def screen(best_at, extensions=4):
        opts = datarich.parse_args(["screen", "--models", "transformer-1", "--out-dir", str(tmp_path),
                                    "--grid-extensions", str(extensions)])
        study = Screened(opts, best_at)
        datarich.stage_screen(study)
        return study.asked, datarich.best_lr(study, "transformer-1")

    assert screen(2e-3) == ([1e-3, 2e-3, 4e-3, 8e-3], 2e-3)
    assert screen(3.2e-2) == ([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2], 3.2e-2)
    assert screen(2.5e-4) == ([1e-3, 2e-3, 4e-3, 8e-3, 5e-4, 2.5e-4, 1.25e-4], 2.5e-4)
    assert screen(1, extensions=2) == ([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2], 3.2e-2)
