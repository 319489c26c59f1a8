"""`revdeq convert`: checkpoints and the earlier port's model.pt to slim model directories, in-process and
as a subprocess; hostile and broken inputs exit 2 with one line and write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import FIXTURES, Hostile, invoke, one_error_line, run_cli, trained_run, write_revdeq_pytorch_model

needs_fixture = pytest.mark.skipif(not (FIXTURES / "model.pt").is_file(),
                                   reason=f"fixture {FIXTURES} absent (CI clones shared/ beside the repo)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def test_checkpoint_to_slim_model_dir(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import revdeq_cli  # noqa: F401  (registers the Auto classes)

    dest = tmp_path / "model"
    result = invoke("convert", run, dest)
    assert result.exit_code == 0, result.output
    assert "checkpoint-000002" in result.stdout and "left out: training_state.pt" in result.stdout
    files = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "training_state.pt" not in files
    model = AutoModelForCausalLM.from_pretrained(dest)
    original = AutoModelForCausalLM.from_pretrained(run / "checkpoint-000002")
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    tok = AutoTokenizer.from_pretrained(dest)
    ids = torch.tensor([tok("def f():")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, original.eval()(ids).logits)
    # A slim model has no training settings: eval then needs --dataset, and says so.
    no_settings = invoke("eval", dest)
    assert no_settings.exit_code == 2
    one_error_line(no_settings.stderr, "--dataset")


def test_dtype_conversion(run, tmp_path):
    result = invoke("convert", run / "final", tmp_path / "half", "--dtype", "bfloat16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dtype"] == "bfloat16" and data["from"] == "checkpoint"
    info = json.loads(invoke("inspect", tmp_path / "half", "--json").stdout)
    assert set(info["dtypes"]) == {"bfloat16"}
    assert info["config"]["dtype"] == "bfloat16"


@needs_fixture
def test_revdeq_pytorch_fixture(tmp_path):
    dest = tmp_path / "ported"
    result = invoke("convert", FIXTURES / "model.pt", dest, "--from", "revdeq-pytorch")
    assert result.exit_code == 0, result.output
    assert "20,672 total" in result.stdout and "pass --tokenizer" in result.stderr
    info = json.loads(invoke("inspect", dest, "--json").stdout)
    assert info["parameters"]["total"] == sum(
        torch.Size(t["shape"]).numel() for t in json.loads((FIXTURES / "model.expected.json").read_text())[
            "tensors"].values())


def test_revdeq_pytorch_with_a_tokenizer(tmp_path):
    path = tmp_path / "model.pt"
    write_revdeq_pytorch_model(path)
    result = invoke("convert", path, tmp_path / "out", "--tokenizer", "byte")
    assert result.exit_code == 0, result.output
    gen = invoke("generate", "ab", "-c", tmp_path / "out", "--max-new-tokens", "3", "--temperature", "0")
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.startswith("ab")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 16


def test_a_converted_checkpoints_tokenizer_declares_the_models_context(run, tmp_path):
    import shutil

    old = shutil.copytree(run / "checkpoint-000002", tmp_path / "old")  # as saved before: an unbounded window
    data = json.loads((old / "tokenizer_config.json").read_text())
    data["model_max_length"] = int(1e30)
    (old / "tokenizer_config.json").write_text(json.dumps(data))
    result = invoke("convert", old, tmp_path / "model")
    assert result.exit_code == 0, result.output
    context = json.loads((tmp_path / "model" / "config.json").read_text())["max_position_embeddings"]
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["model_max_length"] == context == 32


def test_malicious_model_pt_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": {}, "config": Hostile(marker)}, path)
    for source_format in ("auto", "revdeq-pytorch"):
        result = invoke("convert", path, tmp_path / "out", "--from", source_format)
        assert result.exit_code == 2
        one_error_line(result.stderr, str(path), "refusing")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_malicious_training_state_in_a_checkpoint_is_refused(run, tmp_path):
    import shutil

    marker = tmp_path / "pwned"
    ckpt = shutil.copytree(run / "checkpoint-000002", tmp_path / "checkpoint-000002")
    torch.save({"step": 2, "settings": Hostile(marker)}, ckpt / "training_state.pt")
    result = invoke("convert", ckpt, tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result.stderr, "training_state.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make_source", "fragment"),
    [
        (lambda p: p / "missing", "no such file or directory"),
        (lambda p: (p / "empty-run").mkdir() or p / "empty-run", "no checkpoint"),
        (lambda p: (p / "junk.pt").write_bytes(b"\x00garbage") and p / "junk.pt", "not a zip-format torch file"),
    ],
)
def test_bad_sources(tmp_path, make_source, fragment):
    source = make_source(tmp_path)
    result = invoke("convert", source, tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result.stderr, str(source), fragment)
    assert not (tmp_path / "out").exists()


def test_existing_dest_and_misplaced_tokenizer(run, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    result = invoke("convert", run, dest)
    assert result.exit_code == 2
    one_error_line(result.stderr, str(dest), "already exists")
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    result = invoke("convert", run, tmp_path / "x", "--tokenizer", "byte")
    assert result.exit_code == 2
    one_error_line(result.stderr, "--tokenizer")


@needs_fixture
def test_subprocess(tmp_path):
    ok = run_cli("convert", FIXTURES / "model.pt", tmp_path / "ported", "--from", "revdeq-pytorch")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ported" / "model.safetensors").is_file()
    bad = run_cli("convert", tmp_path / "missing.pt", tmp_path / "out")
    assert bad.returncode == 2
    one_error_line(bad.stderr, "missing.pt")
