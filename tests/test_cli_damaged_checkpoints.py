"""Every command that opens a checkpoint (generate, eval, convert, inspect, train --resume) meets every kind of
damage with exit code 2, one `revdeq: error:` line naming the damaged file, no traceback, and nothing
written: not into the checkpoint, not a DEST, not into the run directory. All go through
`revdeq_cli.checkpoints.verify.open_checkpoint`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_error_line, trained_run
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint-000002"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def _edit_config(ckpt: Path, **changes) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _edit_state(ckpt: Path, key: str, value: object = None) -> None:
    """Delete `key` from training_state.pt, or set it to `value`."""
    path = ckpt / "training_state.pt"
    state = torch.load(path, weights_only=True)
    if value is None:
        del state[key]
    else:
        state[key] = value
    torch.save(state, path)


def _drop_tensor(ckpt: Path, name: str) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


_DELETE = object()

# damage id -> (how to damage a checkpoint copy, the file its error line must name, another fragment)
DAMAGES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "weights-truncated": (lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:1000]), "model.safetensors", "truncated"),
    "weights-random-bytes": (lambda c: (c / "model.safetensors").write_bytes(bytes(range(256)) * 20),
                             "model.safetensors", "not a safetensors file"),
    "weights-cut-in-the-data": (lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:-8]), "model.safetensors", "truncated"),
    "weights-foreign": (lambda c: save_file({"transformer.h.0.attn.weight": torch.zeros(4, 4)},
                                            str(c / "model.safetensors")), "model.safetensors", "not a revdeq"),
    "weights-missing-tensor": (lambda c: _drop_tensor(c, "ln_f.weight"), "model.safetensors", "ln_f.weight"),
    "config-not-json": (lambda c: (c / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    "config-field-missing": (lambda c: _edit_config(c, hidden_size=_DELETE), "config.json", "hidden_size"),
    "config-field-wrong-type": (lambda c: _edit_config(c, hidden_size="32"), "config.json", "hidden_size"),
    "config-bool-wrong-type": (lambda c: _edit_config(c, bias="yes"), "config.json", "bias"),
    "config-shapes-disagree": (lambda c: _edit_config(c, hidden_size=64), "config.json", "model.safetensors"),
    "config-vocab-disagrees": (lambda c: _edit_config(c, vocab_size=300), "config.json", "implies shape"),
    "config-of-another-model": (lambda c: _edit_config(c, model_type="gpt2"), "config.json", "'gpt2'"),
    "generation-config-not-json": (lambda c: (c / "generation_config.json").write_text("[1,"),
                                   "generation_config.json", "not valid JSON"),
    "tokenizer-json-missing": (lambda c: (c / "tokenizer.json").unlink(), "tokenizer.json", "missing"),
    "tokenizer-json-unreadable": (lambda c: (c / "tokenizer.json").write_text('{"model": 1}'),
                                  "tokenizer.json", "unreadable"),
    "tokenizer-config-missing": (lambda c: (c / "tokenizer_config.json").unlink(), "tokenizer_config.json",
                                 "missing"),
    "tokenizer-config-not-json": (lambda c: (c / "tokenizer_config.json").write_text("{"),
                                  "tokenizer_config.json", "not valid JSON"),
    "training-state-random-bytes": (lambda c: (c / "training_state.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 64),
                                    "training_state.pt", "cannot read"),
    "training-state-missing-keys": (lambda c: _edit_state(c, "step"), "training_state.pt", "lacks step"),
    "training-state-wrong-type": (lambda c: _edit_state(c, "settings", "oops"), "training_state.pt", "settings"),
    "training-state-not-a-dict": (lambda c: torch.save([1, 2], c / "training_state.pt"), "training_state.pt",
                                  "not a revdeq training state"),
}

COMMANDS: dict[str, Callable[[Path, Path], list[object]]] = {
    "generate": lambda ckpt, tmp: ["generate", "x", "-c", ckpt, "--max-new-tokens", "2"],
    "eval": lambda ckpt, tmp: ["eval", ckpt, "--max-batches", "1"],
    "convert": lambda ckpt, tmp: ["convert", ckpt, tmp / "dest"],
    "inspect": lambda ckpt, tmp: ["inspect", ckpt],
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_checkpoint_is_one_line_exit_2_and_writes_nothing(run, tmp_path, command, damage):
    ckpt = shutil.copytree(run / CHECKPOINT, tmp_path / "run" / CHECKPOINT)
    make_damage, named, fragment = DAMAGES[damage]
    make_damage(ckpt)
    before = _snapshot(tmp_path)
    result = invoke(*COMMANDS[command](ckpt, tmp_path))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr, fragment)
    assert f"{ckpt}/{named}" in line or f"{ckpt / named}:" in line, line  # names the damaged file
    assert result.stdout == ""  # inspect: no summary of a damaged checkpoint
    assert _snapshot(tmp_path) == before  # nothing written (convert: no DEST, not even a temp dir)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_dir_opens_its_newest_checkpoint_with_the_same_checks(run, tmp_path, command):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / CHECKPOINT / "tokenizer.json").unlink()
    result = invoke(*COMMANDS[command](copy, tmp_path))
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, str(copy / CHECKPOINT / "tokenizer.json"))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("training-state-random-bytes", "cannot read"),
        ("training-state-missing-keys", "lacks step"),
        ("training-state-wrong-type", "settings"),
        ("training-state-not-a-dict", "not a revdeq training state"),
        ("optimizer-missing", "optimizer"),
        ("training-state-absent", "cannot resume"),
        ("weights-truncated", "model.safetensors"),
        ("config-shapes-disagree", "config.json"),
    ],
)
def test_train_resume_from_a_damaged_checkpoint(run, tmp_path, damage, fragment):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / CHECKPOINT
    if damage == "optimizer-missing":
        _edit_state(ckpt, "optimizer")
    elif damage == "training-state-absent":
        (ckpt / "training_state.pt").unlink()
    else:
        DAMAGES[damage][0](ckpt)
    before = _snapshot(tmp_path)
    for target in (ckpt, copy):  # a checkpoint dir, or a run dir (its newest checkpoint)
        result = invoke("train", "--resume", target, "--max-steps", "3", "--device", "cpu", "--offline")
        assert result.exit_code == 2, result.output
        line = one_error_line(result.stderr, fragment)
        assert str(ckpt) in line, line
    assert _snapshot(tmp_path) == before


def test_converted_model_without_tokenizer_or_training_state_still_opens(run, tmp_path):
    from revdeq_cli.checkpoints.verify import open_checkpoint

    slim = shutil.copytree(run / CHECKPOINT, tmp_path / "slim")
    for name in ("tokenizer.json", "tokenizer_config.json", "training_state.pt"):
        (slim / name).unlink()
    files = open_checkpoint(slim)
    assert not files.has_tokenizer and files.training_state == {}
    assert files.config["model_type"] == "revdeq" and files.weight_files == [slim / "model.safetensors"]
    result = invoke("inspect", slim)
    assert result.exit_code == 0, result.output
    assert "no training_state.pt" in result.stdout


def test_tokenizer_larger_than_the_vocabulary_is_refused(run, tmp_path):
    from revdeq_cli.data.tokenizer import train_bpe_tokenizer

    ckpt = shutil.copytree(run / CHECKPOINT, tmp_path / CHECKPOINT)
    train_bpe_tokenizer(["some text to merge, some text to merge"] * 50, 300).save_pretrained(str(ckpt))
    result = invoke("generate", "x", "-c", ckpt)
    assert result.exit_code == 2
    one_error_line(result.stderr, str(ckpt / "tokenizer.json"), "vocab_size")
