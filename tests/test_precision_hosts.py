"""The suite's outcome does not depend on the host's bfloat16 support, and bf16 runs keep their guarantees.

* `train.precision: auto` is resolved from the capability probe; here the probe is faked (AMX, AVX512-BF16, CUDA
  >= 8.0, none), so a CPU without bf16 still exercises the bf16 branch of the logic.
* Where the host multiplies bf16 natively (`deq.precision.native_low_precision`), a bf16 run resumed after SIGTERM is
  bit-identical to an uninterrupted one, and `revdeq eval` equals the trainer's own final validation loss; elsewhere
  these are skipped (emulated bf16 is 10x slower and says nothing about the hardware users train on).
* A `revdeq train` refused for its inputs writes nothing: no runs/, no run directory, no lock.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_TRAIN, invoke, one_error_line, small_corpus
from test_run_dir import EXACT, Trainer, _weights
from test_train_cli import TINY_FLAGS

from revdeq_cli.deq import precision as probe
from revdeq_cli.training import precision as train_precision

NATIVE_BF16 = probe.native_low_precision("cpu") is torch.bfloat16
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no bfloat16 matrix instructions "
                                       "(AMX or AVX512-BF16): bf16 would be emulated")


def _with_precision(flags: list[str], precision: str) -> list[str]:
    """`flags` with the value after `--precision` replaced."""
    i = flags.index("--precision")
    return [*flags[:i + 1], precision, *flags[i + 2:]]


# --------------------------------------------------------------------------- auto, with the probe faked
@pytest.mark.parametrize("host, device, chosen", [
    ("amx", "cpu", "bf16"), ("avx512_bf16", "cpu", "bf16"), ("neither", "cpu", "fp32"),
    ("cuda 8.0", "cuda", "bf16"), ("cuda 7.5", "cuda", "fp32"),
])
def test_auto_follows_the_capability_probe(monkeypatch, host, device, chosen):
    """The real chain, `resolve_precision` -> `native_low_precision` -> torch's probes, with only torch's probes
    faked: what `auto` picks on each kind of host, whatever this host is."""
    monkeypatch.setattr(train_precision, "native_low_precision", probe.native_low_precision)  # undo conftest's pin
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: host == "amx")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: host == "avx512_bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: host.startswith("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if host == "cuda 8.0"
                        else (7, 5))
    probe.native_low_precision.cache_clear()
    try:
        assert train_precision.resolve_precision("auto", torch.device(device)) == chosen
        for explicit in ("fp32", "bf16", "fp16"):  # an explicit format is never changed
            assert train_precision.resolve_precision(explicit, torch.device(device)) == explicit
        warned = train_precision.emulated_precision_warning("bf16", torch.device(device)) is not None
        assert warned == (device == "cpu" and chosen == "fp32")
    finally:
        probe.native_low_precision.cache_clear()


def test_the_suite_pins_auto_to_fp32_in_process():
    """conftest's session-wide pin: module-scoped fixtures that train (e.g. `trained_run`) resolve auto as fp32."""
    assert train_precision.resolve_precision("auto", torch.device("cpu")) == "fp32"


# --------------------------------------------------------------------------- bf16 guarantees, on bf16 hardware
@needs_native_bf16
def test_bf16_resume_is_bit_identical_after_sigterm(tmp_path):
    corpus, cache = small_corpus(tmp_path / "corpus"), tmp_path / "cache"
    flags = _with_precision(TINY_FLAGS, "bf16")

    def command(out: Path, *extra: str) -> list[str]:
        import sys

        return [sys.executable, "-m", "revdeq_cli", "train", "--dataset", str(corpus), "--out-dir", str(out), *extra,
                *flags]

    def in_process(out: Path, *extra: str):
        return invoke("train", "--dataset", corpus, "--out-dir", out, "--set", f"data.cache_dir={cache}", *extra,
                      *flags)

    cut = tmp_path / "cut"
    run = Trainer(command(cut, "--max-steps", "500", *EXACT), str(cache), tmp_path)
    run.wait_for("step   3/500")
    run.proc.send_signal(signal.SIGTERM)
    output = run.finish()
    assert run.proc.returncode == 128 + signal.SIGTERM, output
    assert "device cpu, bf16" in output, output
    [saved] = [p for p in cut.iterdir() if p.name.startswith("checkpoint-")]
    step = int(saved.name.split("-")[1])
    resumed = in_process(cut, "--resume", "auto", "--max-steps", str(step + 2))
    assert resumed.exit_code == 0 and f"resumed from {saved} at step {step}" in resumed.stdout, resumed.output
    full = in_process(tmp_path / "full", "--max-steps", str(step + 2), *EXACT)
    assert full.exit_code == 0 and "device cpu, bf16" in full.stdout, full.output
    a, b = _weights(cut / "final"), _weights(tmp_path / "full" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


@needs_native_bf16
def test_bf16_eval_equals_the_trainers_validation_loss(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    trained = invoke("train", "--dataset", corpus, "--out-dir", run, "--set", f"data.cache_dir={tmp_path / 'cache'}",
                     *_with_precision(TINY_TRAIN, "bf16"))
    assert trained.exit_code == 0 and "device cpu, bf16" in trained.stdout, trained.output
    result = invoke("eval", run, "--json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["results"]
    inspected = json.loads(invoke("inspect", run, "--json").stdout)
    assert inspected["settings"]["train"]["precision"] == "bf16"  # stored as what it trained in
    state = inspected["training"]
    assert row["loss"] == pytest.approx(state["final_val_loss"], abs=1e-5)


# --------------------------------------------------------------------------- refused inputs write nothing
def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name, content, fragment", [
    ("missing.txt", None, "missing.txt"),
    ("empty.txt", "", "empty.txt"),
    ("notext.jsonl", '{"title": "a"}\n{"title": "b"}\n', "text"),
])
def test_a_refused_dataset_leaves_the_working_directory_as_it_was(tmp_path, monkeypatch, name, content, fragment):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    before = _tree(tmp_path)
    result = invoke("train", "--dataset", name, "--max-steps", "3", "--offline", "--progress", "plain")
    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, fragment)
    assert _tree(tmp_path) == before  # no runs/, no run directory, no lock


def test_a_refused_model_setting_after_the_data_writes_nothing(tmp_path, monkeypatch):
    """A setting that only the prepared data can refuse (a vocabulary smaller than the tokenizer's) is checked
    before the run directory is made too."""
    monkeypatch.chdir(tmp_path)
    corpus = small_corpus(tmp_path / "corpus")
    before = _tree(tmp_path)
    result = invoke("train", "--dataset", corpus, "--out-dir", "run", "--set", "model.vocab_size=10",
                    *TINY_TRAIN)
    assert result.exit_code == 2, result.output
    # the last line: preparing the local text files may show the datasets library's progress first
    assert result.stderr.strip().splitlines()[-1].startswith("revdeq: error: model.vocab_size: 10 is smaller")
    assert _tree(tmp_path) == before
