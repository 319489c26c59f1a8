"""The token cache: where it lives, reuse, atomic writes, two processes at once, storage dtype."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from revdeq_cli.data import corpus as corpus_module
from revdeq_cli.data import prepare_corpus, resolve_cache_dir


def entries(root: Path, kind: str = "tokens") -> list[str]:
    return sorted(p.name for p in (root / kind).iterdir()) if (root / kind).exists() else []


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("REVDEQ_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("REVDEQ_CACHE_DIR")
    import platformdirs

    assert resolve_cache_dir() == Path(platformdirs.user_cache_dir("revdeq"))


def test_second_prepare_reads_the_cache_without_tokenising(tmp_path, monkeypatch):
    first = prepare_corpus("pydoc", tokenizer="byte", cache_dir=tmp_path)
    assert entries(tmp_path) == [first.fingerprint] and first.cache_path.parent == tmp_path / "tokens"
    meta = json.loads((first.cache_path / "meta.json").read_text())
    assert meta["dtype"] == "<u2" and meta["splits"]["train"]["tokens"] == len(first.splits["train"])

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again despite a cache entry")

    monkeypatch.setattr(corpus_module, "encode_documents", fail)
    second = prepare_corpus("pydoc", tokenizer="byte", cache_dir=tmp_path)
    assert isinstance(second.splits["train"], np.memmap)
    for split in first.splits:
        assert (second.splits[split] == first.splits[split]).all()
    assert second.split_bytes == first.split_bytes


def test_changed_local_file_gets_a_new_entry(tmp_path):
    path = tmp_path / "c.jsonl"
    docs = [f"doc {i} " * 5 for i in range(80)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    a = prepare_corpus(str(path), tokenizer="byte", cache_dir=tmp_path / "cache")
    path.write_text("".join(json.dumps({"text": d + "!"}) + "\n" for d in docs))
    b = prepare_corpus(str(path), tokenizer="byte", cache_dir=tmp_path / "cache")
    assert a.fingerprint != b.fingerprint and len(entries(tmp_path / "cache")) == 2


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    real = corpus_module.encode_documents
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash half-way through tokenising
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "encode_documents", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus("pydoc", tokenizer="byte", cache_dir=tmp_path)
    assert list((tmp_path / "tokens").iterdir()) == []  # no entry and no temporary directory
    monkeypatch.setattr(corpus_module, "encode_documents", real)
    assert prepare_corpus("pydoc", tokenizer="byte", cache_dir=tmp_path).splits["train"].size > 0


@pytest.mark.slow  # two fresh interpreters importing transformers: 10-25 s on 2 busy cores
def test_two_processes_building_the_same_entry(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from revdeq_cli.data import prepare_corpus
        c = prepare_corpus("pydoc", tokenizer="bpe:600", cache_dir=sys.argv[1])
        print(c.fingerprint, len(c.splits["train"]), int(c.splits["train"].sum()))
        """
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in outs]
    results = [out.decode().split() for out, _ in outs]
    assert results[0] == results[1]
    assert entries(tmp_path) == [results[0][0]] and len(entries(tmp_path, "tokenizers")) == 1  # no .tmp-* left


def test_vocabulary_over_65535_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(tmp_path / "tok")
    docs = [" ".join(f"w{(i * 997 + j * 7919) % 70_000}" for j in range(30)) for i in range(100)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = prepare_corpus(str(tmp_path / "c.jsonl"), tokenizer=str(tmp_path / "tok"))
    assert corpus.vocab_size == 70_002 and corpus.eos_token_id == 70_001
    assert all(corpus.splits[s].dtype == np.uint32 for s in corpus.splits)
    everything = np.concatenate([np.asarray(corpus.splits[s]) for s in corpus.splits])
    assert everything.max() == 70_001 and (everything[everything != 70_001] >= 65_536).any()
    assert len(everything) == 100 * 31


def test_concurrent_builders_wait_for_one_another(tmp_path):
    """Threads hold separate lock handles, like processes: one builds, the other waits and reuses."""
    import threading
    import time

    from revdeq_cli.data.cache import build_entry

    builds = []

    def build(directory: Path) -> None:
        builds.append(directory)
        time.sleep(0.3)
        (directory / "data.bin").write_bytes(b"x" * 10)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(build_entry(tmp_path, "tokens", "k", build))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results == [tmp_path / "tokens" / "k"] * 3
    assert entries(tmp_path) == ["k"] and (tmp_path / "tokens" / "k" / "data.bin").read_bytes() == b"x" * 10


def test_a_crashed_builds_leftovers_are_cleared(tmp_path):
    from revdeq_cli.data.cache import build_entry

    leftover = tmp_path / "tokens" / ".tmp-k-dead"
    leftover.mkdir(parents=True)
    (leftover / "train.bin").write_bytes(b"half")
    build_entry(tmp_path, "tokens", "k", lambda d: (d / "x").write_text("ok"))
    assert entries(tmp_path) == ["k"] and (tmp_path / "tokens" / "k" / "x").read_text() == "ok"
