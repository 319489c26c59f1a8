"""A run directory is never clobbered and preemption loses nothing (issue 18): SIGTERM / SIGUSR1 stop at a step
boundary with a checkpoint (real processes, real signals, torchrun included), a directory holding another run is
refused (or cleared with --overwrite), a second trainer is refused while the first holds the lock, and a full disk
while checkpointing is one line that names the newest complete checkpoint."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_error_line
from test_train_cli import TINY_FLAGS, _env, needs_torchrun, torchrun_cmd
from test_train_loop import small_corpus  # noqa: F401  (session fixture: the local test corpus)

from revdeq_cli import checkpoints as ckpt
from revdeq_cli.checkpoints import atomic
from revdeq_cli.training.run_dir import LOCK_NAME, RunDirBusyError, RunLock

# A constant rate and no warmup: a run resumed with a new --max-steps computes what one run to that step does.
# nothing that follows the planned steps (the learning-rate schedule, the penalty ramp): these tests resume with
# another --max-steps than the interrupted run planned
EXACT = ["--eval-every", "0", "--save-every", "0", "--set", "log.log_every=1", "--set", "train.schedule=constant",
         "--set", "train.warmup_steps=0", "--set", "solver.penalty_ramp=0"]


def _train_cmd(corpus: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "revdeq_cli", "train", "--dataset", corpus, "--out-dir", str(out), *extra,
            *TINY_FLAGS]


def _in_process(corpus: str, cache: str, out: Path, *extra: str):
    return invoke("train", "--dataset", corpus, "--out-dir", out, "--set", f"data.cache_dir={cache}", *extra,
                  *TINY_FLAGS)


class Trainer:
    """A real `revdeq train` process; `wait_for(prefix)` reads its output up to a line starting with it."""

    def __init__(self, cmd: list[str], cache: str, cwd: Path, **popen) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(cache),
                                     cwd=cwd, **popen)
        self.lines: list[str] = []

    def wait_for(self, prefix: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(prefix):
                return
        pytest.fail(f"the run ended before {prefix!r}:\n{self.output}")

    def finish(self, timeout: float = 120) -> str:
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        self.lines.append(rest)
        return self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _error_line(stderr: str, *fragments: str) -> str:
    """`one_error_line`, less the datasets library's progress bar when this test prepared the corpus first."""
    return one_error_line("\n".join(line for line in stderr.splitlines() if "split:" not in line), *fragments)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


# --------------------------------------------------------------------------- preemption
def test_sigterm_finishes_the_step_saves_exits_143_and_resume_auto_is_bit_identical(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    cut = tmp_path / "cut"
    run = Trainer(_train_cmd(corpus, cut, "--max-steps", "500", *EXACT), cache, tmp_path)
    run.wait_for("step   3/500")
    run.proc.send_signal(signal.SIGTERM)
    output = run.finish()
    assert run.proc.returncode == 128 + signal.SIGTERM, output
    saved = [p for p in cut.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and "SIGTERM: stopping after this step" in output, output
    step = int(saved[0].name.split("-")[1])
    assert step >= 3 and f"interrupted: saved {saved[0]} (step {step}, on SIGTERM)" in output, output
    assert not (cut / LOCK_NAME).exists()  # released on the way out

    resumed = _in_process(corpus, cache, cut, "--resume", "auto", "--max-steps", str(step + 2))
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {saved[0]} at step {step}" in resumed.stdout
    full = _in_process(corpus, cache, tmp_path / "full", "--max-steps", str(step + 2), *EXACT)
    assert full.exit_code == 0, full.output
    a, b = _weights(cut / "final"), _weights(tmp_path / "full" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit

    def losses(text: str) -> list[list[str]]:  # the printed loss of the last step
        last = re.compile(rf"^step +{step + 2}/{step + 2} ")
        return [line.split("|")[:2] for line in text.splitlines() if last.match(line)]

    assert losses(resumed.stdout) == losses(full.stdout) != []


def test_sigusr1_also_saves_the_step_and_exits_138(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    out = tmp_path / "run"
    run = Trainer(_train_cmd(corpus, out, "--max-steps", "500", "--save-every", "100", "--eval-every", "0",
                             "--set", "log.log_every=1"), cache, tmp_path)
    run.wait_for("step   2/500")
    run.proc.send_signal(signal.SIGUSR1)
    output = run.finish()
    assert run.proc.returncode == 128 + signal.SIGUSR1, output
    [saved] = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert "(step" in output and "on SIGUSR1)" in output
    assert ckpt.load_training_state(saved)["step"] == int(saved.name.split("-")[1]) >= 2


def test_a_stop_signal_in_the_last_step_saves_it_and_resume_does_the_final_evaluation(tmp_path, small_corpus,  # noqa: F811
                                                                                       monkeypatch):
    """In process, a real SIGTERM to this process while the last step runs: the step is saved and the run
    stops (the final evaluation may not fit a scheduler's grace period); --resume auto does only the rest."""
    from revdeq_cli.training.progress import PlainProgress

    corpus, cache = small_corpus
    update = PlainProgress.update

    def signal_at_the_last_step(self, stats):
        update(self, stats)
        if stats.step == stats.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(PlainProgress, "update", signal_at_the_last_step)
    unhandled: list[int] = []  # while it trains the trainer replaces this guard; without it, SIGTERM ends pytest
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    out = tmp_path / "run"
    try:
        stopped = _in_process(corpus, cache, out, "--max-steps", "3", *EXACT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not unhandled
    assert stopped.exit_code == 143, stopped.output
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3] and not (out / "final").exists()
    monkeypatch.setattr(PlainProgress, "update", update)
    resumed = _in_process(corpus, cache, out, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert "done: 3/3 steps" in resumed.stdout and (out / "final").is_dir()
    assert not re.search(r"^step +\d+/", resumed.stdout, flags=re.M)  # no step trained again


@needs_torchrun
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_with_one_checkpoint(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    out = tmp_path / "ddp"
    run = Trainer(torchrun_cmd(*_train_cmd(corpus, out, "--max-steps", "500", *EXACT)[1:]), cache, tmp_path,
                  start_new_session=True)
    try:
        run.wait_for("step   3/500")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)  # what a scheduler sends; torchrun forwards it to both workers
        output = run.finish(timeout=120)
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    # torchrun kills workers that are still running 30 s after it forwarded the signal: both ranks left on
    # their own, so neither waited in a collective for the other.
    assert time.monotonic() - sent < 25, output
    saved = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1, output
    state = ckpt.load_training_state(saved[0])
    assert state["world_size"] == 2 and state["step"] == int(saved[0].name.split("-")[1]) >= 3
    assert output.count("interrupted: saved") == 1 and "on SIGTERM" in output, output
    assert "Traceback" not in output.split("interrupted: saved")[0], output
    assert not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------- a used run directory
def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_used_run_directory_is_refused_unchanged_and_overwrite_clears_it(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    out = tmp_path / "run"
    first = _in_process(corpus, cache, out, "--max-steps", "3", "--save-every", "1", "--eval-every", "0")
    assert first.exit_code == 0, first.output
    (out / "slurm-1234.out").write_text("a scheduler's log, not the run's\n")
    before = _snapshot(out)

    refused = _in_process(corpus, cache, out, "--max-steps", "2", "--lr", "1e-3")
    assert refused.exit_code == 2
    _error_line(refused.stderr, str(out), "holds another run", "--resume auto", "--overwrite")
    assert _snapshot(out) == before  # nothing of the old run changed

    both = _in_process(corpus, cache, out, "--resume", "auto", "--overwrite")
    assert both.exit_code == 2
    _error_line(both.stderr, "train.overwrite", "--resume")
    assert _snapshot(out) == before

    again = _in_process(corpus, cache, out, "--max-steps", "2", "--lr", "1e-3", "--overwrite")
    assert again.exit_code == 0, again.output
    assert "overwrite: deleted the earlier run" in again.stdout
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # none of the old run's 1, 2, 3 beside it
    assert (out / "slurm-1234.out").read_text() == "a scheduler's log, not the run's\n"
    stored = ckpt.load_training_state(out / "final")["settings"]["train"]
    assert stored["lr"] == 1e-3 and stored["overwrite"] is False  # the flag acts once; resuming does not delete
    resumed = _in_process(corpus, cache, out, "--resume", "auto", "--max-steps", "3")
    assert resumed.exit_code == 0 and [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3], resumed.output


# --------------------------------------------------------------------------- one trainer at a time
def test_a_second_trainer_exits_2_naming_the_directory_and_the_holders_process(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    out = tmp_path / "run"
    first = Trainer(_train_cmd(corpus, out, "--max-steps", "500", "--save-every", "1", "--eval-every", "0",
                               "--set", "log.log_every=1"), cache, tmp_path)
    try:
        first.wait_for("step   2/500")
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):  # --overwrite must not delete a live run either
            second = _in_process(corpus, cache, out, "--max-steps", "600", *extra)
            assert second.exit_code == 2, second.output
            _error_line(second.stderr, str(out), f"process {first.proc.pid}", "another trainer")
        assert ckpt.list_checkpoints(out)  # the first run's checkpoints are still there
    finally:
        first.proc.send_signal(signal.SIGINT)
        output = first.finish()
    assert first.proc.returncode == 130, output
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_and_the_lock_goes_on_any_exit(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}))  # left by a crash
    result = _in_process(corpus, cache, out, "--max-steps", "2", "--eval-every", "0")
    assert result.exit_code == 0, result.output
    assert f"took over the lock of process {gone.pid}" in result.stdout
    assert not (out / LOCK_NAME).exists()

    missing = _in_process(str(tmp_path / "no-such-corpus"), cache, tmp_path / "other", "--max-steps", "2")
    assert missing.exit_code == 2  # failed after taking the lock: released, and no empty directory left
    assert not (tmp_path / "other").exists()


def test_without_flock_the_lock_falls_back_to_the_process_id(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": alive.pid, "host": os.uname().nodename}))
        with pytest.raises(RunDirBusyError) as err:
            RunLock(tmp_path).acquire()
        assert err.value.holder == alive.pid and str(alive.pid) in str(err.value)
    finally:
        alive.kill()
        alive.wait()
    with RunLock(tmp_path) as lock:  # its process is gone now
        assert lock.took_over is not None and lock.took_over.pid == alive.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


# --------------------------------------------------------------------------- a full disk
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_half_checkpoint(tmp_path, small_corpus,  # noqa: F811
                                                                                    monkeypatch):
    corpus, cache = small_corpus
    real_save = torch.save
    saves = []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(ckpt.TRAINING_STATE):
            saves.append(f)
            if len(saves) == 3:  # the third checkpoint: half a file, then the disk is full
                Path(f).write_bytes(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 100 << 10)  # what the full disk has left
    out = tmp_path / "run"
    result = _in_process(corpus, cache, out, "--max-steps", "5", "--save-every", "1", "--eval-every", "0")
    assert result.exit_code == 2, result.output
    line = _error_line(result.stderr, str(out), "the disk is full (100 KiB free)", "while writing checkpoint-000003",
                          f"the newest complete checkpoint is {out / 'checkpoint-000002'}", "--save-every",
                          "--set train.keep_last=1, now 3", "another --out-dir", "--resume auto")
    assert "Traceback" not in result.output, line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "checkpoint-000002", "config.yaml", "logs"]
    assert ckpt.load_checkpoint(out).meta["step"] == 2  # the earlier checkpoints are intact


def test_torch_saves_own_error_on_a_full_disk_is_taken_for_one(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as a bare RuntimeError; with the space used up it is a `DiskFullError`, with
    space left it stays what it was. The temp dir goes either way."""
    def failing_write():
        with ckpt.atomic_dir(tmp_path / "checkpoint-000004") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 926912 vs 926804")

    monkeypatch.setattr(atomic, "free_bytes", lambda path: 4096)
    with pytest.raises(ckpt.DiskFullError) as err:
        failing_write()
    assert "checkpoint-000004" in str(err.value) and err.value.directory == tmp_path
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        failing_write()
    assert list(tmp_path.iterdir()) == []


def test_resume_reads_the_checkpoints_training_state_once(tmp_path, small_corpus, monkeypatch):  # noqa: F811
    """`train --resume` opens the checkpoint in the command (to read its settings) and hands it to the trainer,
    which does not open it again: training_state.pt is loaded once."""
    corpus, cache = small_corpus
    out = tmp_path / "run"
    first = _in_process(corpus, cache, out, "--max-steps", "2", "--save-every", "1", "--eval-every", "0")
    assert first.exit_code == 0, first.output
    loads: list[str] = []
    real_load = torch.load

    def load(f, *args, **kwargs):
        if str(f).endswith(ckpt.TRAINING_STATE):
            loads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    resumed = _in_process(corpus, cache, out, "--resume", "auto", "--max-steps", "3", "--eval-every", "0")
    assert resumed.exit_code == 0, resumed.output
    assert loads == [str(out / "checkpoint-000002" / ckpt.TRAINING_STATE)]


def test_an_out_dir_that_cannot_be_made_is_one_line_exit_2(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory's parent should be\n")
    result = _in_process(corpus, cache, blocker / "run", "--max-steps", "2")
    assert result.exit_code == 2
    _error_line(result.stderr, str(blocker / "run"), "cannot create the run directory", "--out-dir")
    assert blocker.read_text().startswith("a file")
