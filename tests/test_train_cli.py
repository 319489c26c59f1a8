"""`revdeq train` as users run it: a subprocess with Ctrl-C (exit 130, checkpoint, --resume auto), and
two processes under torchrun (gloo) whose rank-0 checkpoint loads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_loop import small_corpus  # noqa: F401  (session fixture: the local test corpus)

TINY_FLAGS = [
    "--seq-len", "32", "--batch-size", "4", "--solver-steps", "2", "--device", "cpu", "--offline",
    "--progress", "plain", "--set", "model.hidden_size=32", "--set", "model.num_attention_heads=2",
    "--set", "model.intermediate_size=64", "--set", "train.warmup_steps=1", "--set", "train.eval_batch_size=64",
    "--set", "train.eval_batches=1",
]


def _env(cache: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", REVDEQ_CACHE_DIR=cache)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_auto_continues(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "revdeq_cli", "train", "--dataset", corpus, "--out-dir", str(out),
           "--max-steps", "500", "--eval-every", "0", "--save-every", "0", "--set", "log.log_every=1", *TINY_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(cache),
                            cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step   3/500"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    saved = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and "interrupted: saved" in output, output
    step = int(saved[0].name.split("-")[1])
    assert step >= 3

    # Resume with only --resume and the run dir: the run's stored settings supply everything else.
    resumed = subprocess.run(
        [sys.executable, "-m", "revdeq_cli", "train", "--resume", "auto", "--out-dir", str(out),
         "--max-steps", str(step + 2)],
        capture_output=True, text=True, env=_env(cache), cwd=tmp_path, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {saved[0]} at step {step}" in resumed.stdout
    assert f"done: {step + 2}/{step + 2} steps" in resumed.stdout
    assert (out / "final").is_dir()


def test_bad_setting_exits_2_naming_the_field_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "revdeq_cli", "train", "--beta", "1", "--out-dir", "run"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "solver.beta" in result.stderr and "--beta" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_gloo_run_through_torchrun_saves_a_loadable_rank0_checkpoint(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node", "2",
           "-m", "revdeq_cli", "train", "--dataset", corpus, "--out-dir", str(out), "--max-steps", "4",
           "--eval-every", "2", "--save-every", "2", *TINY_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache),
                            cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=int(os.environ.get('REVDEQ_TEST_TORCHRUN_TIMEOUT', 300)))
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun forwards SIGTERM to its workers (they run in sessions of their own)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun run timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Rank 0 alone prints and saves: one summary, one set of checkpoints.
    assert result.stdout.count("done: 4/4 steps") == 1
    assert "2 process(es)" in result.stdout and "512 tokens/step" not in result.stdout

    from revdeq_cli.training.checkpoint import load_checkpoint

    model, tokenizer, settings, meta = load_checkpoint(out)
    assert meta["step"] == 4 and meta["world_size"] == 2
    assert meta["tokens_seen"] == 4 * 2 * 4 * 32  # steps x processes x batch x seq_len
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("logs")) == [
        "best", "checkpoint-000002", "checkpoint-000004", "config.yaml", "final"]
