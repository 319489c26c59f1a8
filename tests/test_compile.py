"""`--compile` (train.compile): torch.compile of the block(s) f, its fallbacks, and that it changes no numbers
beyond float32 rounding. Real compilation on CPU takes tens of seconds per configuration: those tests are `slow`."""

from __future__ import annotations

import shutil

import pytest
import torch

from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model import compile as rc
from revdeq_cli.model.compile import compile_blocks, is_compiled, uncompile_blocks

HAS_CXX = bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


def _model(solver: str = "reversible", adjoint: str | None = None, **overrides) -> RevDEQForCausalLM:
    torch.manual_seed(0)
    extra = {"num_hidden_layers": 2} if solver == "explicit" else {}
    adjoint = adjoint or ("reversible" if solver == "reversible" else "unrolled")
    return RevDEQForCausalLM(RevDEQConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
        solver=solver, adjoint=adjoint, max_steps=3, tol=None, **extra, **overrides))


class _FakeCompile:
    """Stands in for torch.compile: counts the calls that went through the "compiled" function."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, fn, **_options):
        def compiled(*args, **kwargs):
            self.calls += 1
            if self.fail:
                raise RuntimeError("backend exploded\nsecond line")
            return fn(*args, **kwargs)

        return compiled


# ------------------------------------------------------------------------------------------ plumbing (fast)
def test_compiled_blocks_keep_state_dict_names_and_kv_hook_calls_stay_eager(monkeypatch):
    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    model = _model()
    names = list(model.state_dict())
    assert compile_blocks(model, "cpu", warn=pytest.fail) and is_compiled(model)
    assert list(model.state_dict()) == names
    ids = torch.tensor([[1, 2, 3, 4]])
    model(ids, labels=ids).loss.backward()  # reversible adjoint: f again, with a graph, in the backward pass
    assert fake.calls == 1 + 2 * 3 + 2 * 3  # forward 1 + 2N, backward 2N
    before = fake.calls
    model.eval()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3)
    assert fake.calls == before  # every cached call (prefill and decoding) has a key/value hook: eager
    uncompile_blocks(model)
    assert not is_compiled(model)


def test_unavailable_compile_warns_one_line_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(rc.shutil, "which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    lines: list[str] = []
    model = _model()
    assert compile_blocks(model, "cpu", warn=lines.append) is False
    assert not is_compiled(model)
    assert len(lines) == 1 and "\n" not in lines[0] and "C++ compiler" in lines[0] and "eager" in lines[0]


def test_default_warning_is_a_compile_warning(monkeypatch):
    monkeypatch.setattr(rc.shutil, "which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.warns(rc.CompileWarning, match="running eagerly"):
        compile_blocks(_model(), "cpu")


def test_compile_failing_at_the_first_call_warns_once_and_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", _FakeCompile(fail=True))
    eager, compiled = _model("explicit"), _model("explicit")
    lines: list[str] = []
    assert compile_blocks(compiled, "cpu", warn=lines.append)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    a, b = eager(ids, labels=ids).loss, compiled(ids, labels=ids).loss
    assert torch.equal(a, b)
    compiled(ids, labels=ids)
    assert len(lines) == 1 and "backend exploded" in lines[0] and "second line" not in lines[0]
    assert not is_compiled(compiled)


def test_a_genuine_error_in_f_is_raised_not_hidden(monkeypatch):
    monkeypatch.setattr(torch, "compile", _FakeCompile(fail=True))
    model = _model()
    compile_blocks(model, "cpu", warn=lambda _m: None)
    with pytest.raises(RuntimeError):
        model.blocks[0](torch.zeros(1, 3, 7))  # wrong width: eager raises too


def test_train_compile_setting_compiles_the_trainers_model(tmp_path, monkeypatch):
    from revdeq_cli.settings import resolve_settings
    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.loop import Trainer

    fake = _FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    for name, part in (("train", texts[:10]), ("validation", texts[10:11]), ("test", texts[11:12])):
        (corpus / f"{name}.txt").write_text("\n\n".join(part), encoding="utf-8")
    settings = resolve_settings(sets=[
        "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64", "solver.max_steps=2",
        "data.seq_len=16", "train.batch_size=2", "train.eval_batches=1", "log.progress=plain",
    ], flags={"train.out_dir": str(tmp_path / "run"), "train.max_steps": 1, "train.eval_every": 0,
              "train.save_every": 0, "train.device": "cpu", "data.dataset": str(corpus), "data.offline": True,
              "train.compile": True}, environ={})
    trainer = Trainer(settings, info=DistInfo(), device=torch.device("cpu"))
    trainer.run()
    assert is_compiled(trainer.model) and fake.calls > 0


# ------------------------------------------------------------------------------------------ real compilation (slow)
def _train_losses(solver: str, compile_: bool, steps: int = 3, precision: str | None = None) -> list[float]:
    model = _model(solver)
    if compile_:
        lines: list[str] = []
        assert compile_blocks(model, "cpu", warn=lines.append), lines
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    if compile_:
        assert is_compiled(model), "compilation fell back to eager"
    return losses


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("solver", ["reversible", "explicit"])
def test_compiled_training_matches_eager_losses(solver):
    from torch._dynamo.utils import counters

    counters.clear()
    eager = _train_losses(solver, compile_=False)
    compiled = _train_losses(solver, compile_=True)
    assert counters["stats"]["unique_graphs"] > 0  # something was really compiled
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (eager, compiled)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("adjoint", ["implicit", "phantom", "unrolled"])
def test_compiled_gradients_match_eager_for_every_gradient_method(adjoint):
    solver = "relaxed" if adjoint != "unrolled" else "reversible"
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    grads = []
    for compile_ in (False, True):
        # Implicit: 3 backward-solve steps. This untrained block's backward system does not converge in the
        # default 20 (I - J^T is nearly singular), and an unconverged Broyden run amplifies float32 rounding
        # differences (compiled or not) to percents; a fixed short run is a fixed composition of VJPs of f.
        model = _model(solver, adjoint, implicit_max_steps=3, implicit_tol=1e-12)
        if compile_:
            assert compile_blocks(model, "cpu", warn=pytest.fail)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert is_compiled(model) == compile_
    tolerance = 1e-5
    for name, g in grads[0].items():
        error = ((grads[1][name] - g).norm() / g.norm()).item()
        assert error <= tolerance, (name, error)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_under_bf16_autocast_matches_eager():
    eager = _train_losses("reversible", compile_=False, steps=2, precision="bf16")
    compiled = _train_losses("reversible", compile_=True, steps=2, precision="bf16")
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a - b) <= 1e-2 * abs(a), (eager, compiled)  # bf16 rounding, not float32's


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")
def test_two_process_ddp_run_with_compile_matches_eager(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from pydoc_data.topics import topics

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [topics[k] for k in sorted(topics)]
    for name, part in (("train", texts[:20]), ("validation", texts[20:21]), ("test", texts[21:22])):
        (corpus / f"{name}.txt").write_text("\n\n".join(part), encoding="utf-8")
    finals = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / f"run{flag}"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "revdeq_cli", "train", "--dataset",
               str(corpus), "--out-dir", str(out), "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
               "--seq-len", "32", "--batch-size", "4", "--solver-steps", "2", "--device", "cpu", "--offline",
               "--progress", "plain", "--precision", "fp32", "--set", "model.hidden_size=32",
               "--set", "model.num_attention_heads=2", "--set", "model.intermediate_size=64",
               "--set", "train.eval_batches=1", flag]
        env = dict(os.environ, REVDEQ_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "warning: --compile" not in run.stdout + run.stderr, run.stderr[-3000:]
        finals[flag] = json.loads((out / "final" / "config.json").read_text()), run.stdout
    losses = {flag: [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]
              for flag, (_, stdout) in finals.items()}
    assert losses["--compile"] and len(losses["--compile"]) == len(losses["--no-compile"])
    for a, b in zip(losses["--no-compile"], losses["--compile"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
