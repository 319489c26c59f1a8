"""`--dataset stdlib`: the interpreter's own standard library sources as an offline corpus. Most tests read a small
fake stdlib tree (REVDEQ_STDLIB_DIR or the `root` argument), so they never depend on this Python's files."""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import TINY_TRAIN, invoke, one_error_line

from revdeq_cli.data import DataError, hash_split, prepare_corpus
from revdeq_cli.data.builtin import STDLIB_ENV, StdlibSource
from revdeq_cli.data.sources import resolve_source

EOS = 256  # the byte tokenizer's end-of-text id
EXCLUDED = {  # files the corpus must leave out, and why
    "test/test_os.py": "a test suite",
    "test/support/helper.py": "inside a test suite",
    "lib2to3/tests/data/bom.py": "a test suite",
    "idlelib/idle_test/test_x.py": "a test suite",
    "site-packages/thirdparty.py": "third-party code",
    "dist-packages/debian.py": "third-party code",
    "__pycache__/stray.py": "a bytecode cache",
    "json/__pycache__/decoder.cpython-311.py": "a bytecode cache",
    "json/empty/__init__.py": "empty",
    "README.txt": "not Python",
}


def module_text(name: str) -> str:
    return f'"""The {name} module."""\n\n' + "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(12))


def names_for_every_split() -> list[str]:
    """Module paths, at least one of which hash_split sends to each split (so training has validation/test)."""
    names, need = [], {"train": 3, "validation": 1, "test": 1}
    for i in range(1000):
        name = f"pkg{i % 3}/mod{i}.py"
        if need.get(hash_split(name), 0) > 0:
            need[hash_split(name)] -= 1
            names.append(name)
        if not any(need.values()):
            return sorted(names)
    raise AssertionError("hash_split never chose some split")


def fake_stdlib(root: Path, names: list[str] | None = None, *, excluded: bool = True) -> dict[str, str]:
    """Write a small stdlib tree at `root`; returns the documents it should yield (relative path -> text)."""
    names = names_for_every_split() + ["json/decoder.py", "unittest/case.py"] if names is None else names
    docs = {name: module_text(name) for name in names}
    files = dict(docs)
    if excluded:
        files.update({name: ("" if why == "empty" else module_text(name)) for name, why in EXCLUDED.items()})
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return dict(sorted(docs.items()))


def test_documents_are_the_py_files_outside_tests_site_packages_and_caches(tmp_path):
    docs = fake_stdlib(tmp_path)
    source = StdlibSource(tmp_path)
    assert source.texts == docs  # in relative-path order, every exclusion left out
    assert list(source.documents()) == [(hash_split(name), text) for name, text in docs.items()]
    assert not set(source.texts) & set(EXCLUDED)
    assert "unittest/case.py" in source.texts  # a name merely containing "test" stays


def test_env_var_names_the_stdlib_and_the_description_gives_the_size(tmp_path, monkeypatch):
    docs = fake_stdlib(tmp_path)
    monkeypatch.setenv(STDLIB_ENV, str(tmp_path))
    source = resolve_source("stdlib")
    assert isinstance(source, StdlibSource) and source.root == tmp_path
    chars = sum(len(t) for t in docs.values())
    assert source.description == (
        f"stdlib ({platform.python_implementation()} {platform.python_version()} standard library: "
        f"{len(docs)} files, {chars / 1e3:.0f}k characters from {tmp_path})"
    )


def test_undecodable_bytes_are_replaced_not_dropped(tmp_path):
    (tmp_path / "latin.py").write_bytes(b"# caf\xe9\nx = 1\n")
    assert StdlibSource(tmp_path).texts == {"latin.py": "# caf\ufffd\nx = 1\n"}


def test_a_files_split_depends_only_on_its_path(tmp_path):
    small = fake_stdlib(tmp_path / "a", excluded=False)
    extra = [f"extra/m{i}.py" for i in range(30)]
    fake_stdlib(tmp_path / "b", list(small) + extra, excluded=False)
    splits_a = {text: split for split, text in StdlibSource(tmp_path / "a").documents()}
    splits_b = {text: split for split, text in StdlibSource(tmp_path / "b").documents()}
    for name, text in small.items():
        assert splits_a[text] == splits_b[text] == hash_split(name)


def test_tokenized_splits_hold_each_file_once_and_the_cache_is_reused(tmp_path, monkeypatch):
    docs = fake_stdlib(tmp_path / "lib")
    monkeypatch.setenv(STDLIB_ENV, str(tmp_path / "lib"))
    corpus = prepare_corpus("stdlib", tokenizer="byte", cache_dir=tmp_path / "cache")
    for split in ("train", "validation", "test"):
        ids = np.asarray(corpus.splits[split])
        ends = np.flatnonzero(ids == EOS)  # every document ends with EOS; the other ids are its UTF-8 bytes
        got = [bytes(ids[a + 1:b].tolist()).decode("utf-8") for a, b in zip([-1, *ends[:-1]], ends, strict=True)]
        assert got == [t for n, t in docs.items() if hash_split(n) == split]
    again = prepare_corpus("stdlib", tokenizer="byte", cache_dir=tmp_path / "cache")
    assert again.cache_path == corpus.cache_path


def test_fingerprint_follows_the_files_and_the_python_version(tmp_path, monkeypatch):
    fake_stdlib(tmp_path)
    first = StdlibSource(tmp_path).fingerprint()
    assert StdlibSource(tmp_path).fingerprint() == first  # unchanged tree: the cache entry is reused
    edited = tmp_path / "json" / "decoder.py"
    original = edited.read_text()
    edited.write_text(original.replace("x + 1", "x - 1"))  # same size: only the content differs
    assert StdlibSource(tmp_path).fingerprint() != first
    edited.write_text(original)
    assert StdlibSource(tmp_path).fingerprint() == first
    (tmp_path / "new.py").write_text("y = 2\n")
    assert StdlibSource(tmp_path).fingerprint() != first
    (tmp_path / "new.py").unlink()
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    other = StdlibSource(tmp_path)
    assert other.fingerprint() != first and "3.99.0 standard library" in other.description


@pytest.mark.parametrize("layout", ["empty", "only-excluded", "missing"])
def test_a_tree_without_py_files_is_one_error_line(tmp_path, layout):
    root = tmp_path / "lib"
    if layout == "only-excluded":
        fake_stdlib(root, [], excluded=True)
    elif layout == "empty":
        root.mkdir()
    with pytest.raises(DataError) as err:
        StdlibSource(root)
    message = str(err.value)
    assert "\n" not in message and str(root) in message and "another --dataset" in message
    result = invoke("train", "--dataset", "stdlib", "--out-dir", tmp_path / "run", *TINY_TRAIN,
                    env={STDLIB_ENV: str(root)})
    assert result.exit_code != 0
    one_error_line(result.stderr, str(root), "another --dataset")


def test_dataset_config_is_refused_as_for_pydoc():
    with pytest.raises(DataError, match="--dataset-config 'x' applies to hub datasets only"):
        resolve_source("stdlib", dataset_config="x")


def test_train_on_stdlib_end_to_end(tmp_path):
    docs = fake_stdlib(tmp_path / "lib")
    result = invoke("train", "--dataset", "stdlib", "--out-dir", tmp_path / "run", *TINY_TRAIN,
                    "--max-steps", "2", "--precision", "fp32", env={STDLIB_ENV: str(tmp_path / "lib")})
    assert result.exit_code == 0, result.output
    data_line = next(line for line in result.output.splitlines() if "data: stdlib (" in line)
    assert f"standard library: {len(docs)} files, " in data_line and "k characters from " in data_line


def test_the_real_stdlib_is_a_large_corpus(monkeypatch):
    """Lists (reads) this interpreter's stdlib, ~12 MB on CPython 3.11, without tokenizing it."""
    monkeypatch.delenv(STDLIB_ENV, raising=False)
    source = StdlibSource()
    assert source.root == Path(sysconfig.get_paths()["stdlib"])
    assert len(source.texts) > 500 and sum(len(t) for t in source.texts.values()) > 5_000_000
    assert "os.py" in source.texts and "json/decoder.py" in source.texts
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(name.split("/")) for name in source.texts)
    assert "M characters from " in source.description
