"""Shared by the tests of generate / eval / inspect / convert: one short `revdeq train` per session, a
hostile pickle, and helpers to run the CLI in-process (CliRunner) or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "revdeq-pytorch"

TINY_TRAIN = [
    "--seq-len", "32", "--batch-size", "4", "--solver-steps", "2", "--device", "cpu", "--offline",
    "--progress", "plain", "--precision", "fp32", "--max-steps", "2", "--eval-every", "0", "--save-every", "1",
    "--set", "model.hidden_size=32", "--set", "model.num_attention_heads=2", "--set", "model.intermediate_size=64",
    "--set", "train.warmup_steps=1", "--set", "train.eval_batch_size=64", "--set", "train.eval_batches=1",
    "--set", "log.log_every=1",
]

_SESSION: dict[str, tuple[Path, Path]] = {}


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    """Run `revdeq ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from revdeq_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None, timeout: int = 300):
    """Run `python -m revdeq_cli ARGS` as a real process (what users run)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "revdeq_cli", *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_error_line(stderr: str, *fragments: str) -> str:
    """The single `revdeq: error: ...` line of a failed command (no traceback), checked for `fragments`."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("revdeq: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def small_corpus(root: Path) -> Path:
    """A local dataset (train/validation/test .txt files of pydoc topics): prepared in a fraction of a second."""
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    texts = [topics[k] for k in sorted(topics)]
    for name, part in (("train", texts[:30]), ("validation", texts[30:32]), ("test", texts[32:34])):
        (root / f"{name}.txt").write_text("\n\n".join(part), encoding="utf-8")
    return root


def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, dataset dir) of a 2-step `revdeq train` on the small corpus, made once per session;
    checkpoints at steps 1 and 2, final/ and best/, TensorBoard logs."""
    if "run" not in _SESSION:
        base = tmp_path_factory.mktemp("trained-run")
        corpus = small_corpus(base / "corpus")
        run = base / "run"
        result = invoke("train", "--dataset", corpus, "--out-dir", run, "--set", f"data.cache_dir={base / 'cache'}",
                        *TINY_TRAIN)
        assert result.exit_code == 0, result.output
        _SESSION["run"] = (run, corpus)
    return _SESSION["run"]


class Hostile:
    """Pickles to `os.system("touch MARKER")`: what a malicious checkpoint from the internet holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_revdeq_pytorch_model(path: Path, *, vocab_size: int = 300, positions: int = 16) -> Path:
    """An earlier-port `model.pt` (width 8, 2 heads, MLP 16, no biases, reversible, 2 steps) at `path`."""
    import torch

    sd = {"token_embedding.weight": torch.randn(vocab_size, 8), "position_embedding.weight": torch.randn(positions, 8),
          "layer.attention.in_proj_weight": torch.randn(24, 8), "layer.attention.out_proj.weight": torch.randn(8, 8),
          "layer.ffn.0.weight": torch.randn(16, 8), "layer.ffn.2.weight": torch.randn(8, 16),
          "layer.norm1.weight": torch.ones(8), "layer.norm1.bias": torch.zeros(8), "layer.norm2.weight": torch.ones(8),
          "layer.norm2.bias": torch.zeros(8), "ln_f.weight": torch.ones(8), "ln_f.bias": torch.zeros(8),
          "lm_head.weight": torch.randn(vocab_size, 8)}
    cfg = {"hidden_size": 8, "num_heads": 2, "intermediate_size": 16, "max_position_embeddings": positions,
           "vocab_size": vocab_size, "use_bias": False, "num_fixed_point_iterations": 2, "use_reversible": True,
           "beta": 0.5}
    torch.save({"model_state_dict": sd, "config": cfg}, path)
    return path
