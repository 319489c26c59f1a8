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
import torch
from test_train_loop import small_corpus  # noqa: F401  (session fixture: the local test corpus)

TINY_FLAGS = [
    "--seq-len", "32", "--batch-size", "4", "--solver-steps", "2", "--device", "cpu", "--offline",
    "--progress", "plain", "--precision", "fp32", "--set", "model.hidden_size=32",
    "--set", "model.num_attention_heads=2",
    "--set", "model.intermediate_size=64", "--set", "train.eval_batch_size=64", "--set", "train.eval_batches=1",
]  # no warmup: the default follows the run's length (the torchrun and Ctrl-C + resume runs below rely on it)


TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and not TORCHRUN.exists(),
                                    reason="torchrun not installed")


def torchrun_cmd(*args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2 ARGS`, this environment's torchrun where it has one."""
    return [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--standalone", "--nproc_per_node", "2", *args]


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


@needs_torchrun
def test_two_process_gloo_run_through_torchrun_saves_a_loadable_rank0_checkpoint(tmp_path, small_corpus):  # noqa: F811
    corpus, cache = small_corpus
    out = tmp_path / "ddp"
    cmd = torchrun_cmd("-m", "revdeq_cli", "train", "--dataset", corpus, "--out-dir", str(out), "--max-steps", "4",
                       "--eval-every", "2", "--save-every", "2", *TINY_FLAGS)
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

    from revdeq_cli.checkpoints import load_checkpoint

    model, tokenizer, settings, meta = load_checkpoint(out)
    assert meta["step"] == 4 and meta["world_size"] == 2
    assert meta["tokens_seen"] == 4 * 2 * 4 * 32  # steps x processes x batch x seq_len
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("logs")) == [
        "best", "checkpoint-000002", "checkpoint-000004", "config.yaml", "final"]


# --------------------------------------------------------------------------- defaults that compose (in process)
def _train(argv: list[str], capsys) -> tuple[int, str]:
    from revdeq_cli.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def _compose_flags(corpus: str, cache: str) -> list[str]:
    """Tiny model and data, and nothing else: every other setting is the default."""
    return ["--dataset", corpus, "--set", f"data.cache_dir={cache}", "--offline", "--device", "cpu",
            "--progress", "plain", "--seq-len", "32", "--batch-size", "4", "--set", "model.hidden_size=32",
            "--set", "model.num_attention_heads=2", "--set", "model.intermediate_size=64"]


@pytest.mark.parametrize(("solver", "shown"), [(None, "solver reversible / adjoint reversible"),
                                               ("explicit", "explicit, 1 layer"),
                                               ("anderson", "solver anderson / adjoint implicit")])
def test_a_three_step_run_succeeds_with_every_other_setting_default(solver, shown, tmp_path, small_corpus,  # noqa: F811
                                                                     capsys):
    argv = ["--max-steps", "3", "--out-dir", str(tmp_path / "run"), *_compose_flags(*small_corpus)]
    code, out = _train([*argv, *(["--solver", solver] if solver else [])], capsys)
    assert code in (0, None), out
    assert "done: 3/3 steps" in out and shown in out and "warmup 0" in out


def test_the_short_run_of_a_resume_check_then_resumes_with_its_own_warmup(tmp_path, small_corpus, capsys):  # noqa: F811
    out_dir = tmp_path / "run"
    flags = [*_compose_flags(*small_corpus), "--out-dir", str(out_dir)]
    code, out = _train(["--max-steps", "6", *flags], capsys)
    assert code in (0, None) and "warmup 1)" in out, out
    code, out = _train(["--max-steps", "8", "--resume", "auto", *flags], capsys)
    assert code in (0, None), out
    assert "resumed from" in out and "done: 8/8 steps" in out and "warmup 1)" in out  # kept, not 0.1 * 8


def test_the_default_run_shortened_succeeds(tmp_path, monkeypatch, capsys, small_corpus):  # noqa: F811
    """`revdeq train --max-steps 3` as a new user types it (the default model on the offline pydoc corpus)."""
    monkeypatch.setenv("REVDEQ_CACHE_DIR", small_corpus[1])
    monkeypatch.chdir(tmp_path)
    code, out = _train(["--max-steps", "3", "--device", "cpu", "--progress", "plain"], capsys)
    assert code in (0, None), out
    assert "done: 3/3 steps" in out and "warmup 0" in out
    assert len(list((tmp_path / "runs").glob("pydoc-*/final"))) == 1


def test_a_resume_on_a_machine_without_bf16_keeps_the_format_auto_chose_and_warns(tmp_path, small_corpus, capsys,  # noqa: F811
                                                                                 monkeypatch):
    from revdeq_cli.training import precision as train_precision

    flags = [*_compose_flags(*small_corpus), "--out-dir", str(tmp_path / "run"), "--eval-every", "0"]
    monkeypatch.setattr(train_precision, "native_low_precision", lambda device: torch.bfloat16)  # a bf16 machine
    code, out = _train(["--max-steps", "2", *flags], capsys)
    assert code in (0, None), out
    assert "device cpu, bf16 (auto)" in out and "emulated" not in out
    monkeypatch.setattr(train_precision, "native_low_precision", lambda device: None)  # resumed on a CPU without it
    code, out = _train(["--max-steps", "4", "--resume", "auto", *flags], capsys)
    assert code in (0, None), out
    assert "resumed from" in out and "done: 4/4 steps" in out
    assert "device cpu, bf16\n" in out  # the stored format, not re-resolved to fp32
    assert sum("emulated" in line for line in out.splitlines()) == 1


# --------------------------------------------------------------------------- options from the settings models
def _train_params():
    import typer

    from revdeq_cli.cli.app import app

    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def test_a_flags_help_is_its_settings_description_and_no_default_is_typed():
    from revdeq_cli.cli.train_cmd import FLAGS
    from revdeq_cli.settings import TrainSettings, field_info, option_help, shown_default

    params = _train_params()
    assert set(FLAGS) <= set(params)
    for name, (dotted, option, _) in FLAGS.items():
        param = params[name]
        assert option in param.opts
        assert param.help == option_help(dotted) and field_info(dotted).description in param.help, name
        assert "default" not in param.help.lower(), f"{option} types a default into its help: {param.help!r}"
        assert param.default is None, f"{option}: an option left out must leave the setting to the layers beneath"
        if not isinstance(field_info(dotted).default, bool):
            assert param.show_default == (shown_default(dotted) or False), name
    assert params["lr"].help.startswith(TrainSettings.model_fields["lr"].description)
    assert params["lr"].show_default == "the recipe's"  # the tiny preset's 4e-3 comes from the recipe
    assert params["grad_accum"].show_default == str(TrainSettings.model_fields["grad_accum"].default)
    assert params["offline"].show_default == "online" and params["compile_"].show_default == "no-compile"


def test_train_help_shows_the_models_descriptions():
    from cli_helpers import invoke

    from revdeq_cli.settings import field_info

    result = invoke("train", "--help", env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for dotted in ("train.lr", "solver.beta", "data.seq_len", "train.batch_size"):
        assert field_info(dotted).description in text, dotted
    assert "the recipe's" in text and "(default" not in text
