"""Sources behind `--dataset`: WikiText through the hub code path, local formats, split rules, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from revdeq_cli.data import DataError, hash_split, prepare_corpus, sources

EOS = 256  # the byte tokenizer's end-of-text id


def decode_docs(tokens: np.ndarray) -> list[str]:
    """Split a byte-tokenised split back into its documents (each ends with EOS)."""
    ids = np.asarray(tokens).tolist()
    assert ids and ids[-1] == EOS, "a split ends with the end-of-text token"
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == EOS:
            docs.append(bytes(ids[start:i]).decode("utf-8"))
            start = i + 1
    return docs


# --- WikiText laid out as the hub's Salesforce/wikitext repository --------------------------------------


def wikitext_card() -> str:
    """The hub repo's README.md front matter: one config per variant, parquet files per split."""
    lines = ["---", "language:", "- en", "configs:"]
    for config in ("wikitext-103-raw-v1", "wikitext-2-raw-v1"):
        lines += [f"- config_name: {config}", "  data_files:"]
        for split in ("test", "train", "validation"):
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    return "\n".join([*lines, "---", '# Dataset Card for "wikitext"', ""])


def wikitext_rows(split: str, n_articles: int) -> tuple[list[str], list[str]]:
    """Rows as the real dataset has them (one line per row, headings ' = T = ', blank rows '')
    and the articles they make."""
    rows, articles = [], []
    for a in range(n_articles):
        article = [
            "",
            f" = {split.title()} article {a} = \n",
            "",
            f" The {split} article number {a} begins here , with café and 日本 . \n",
            " = = Section = = \n",
            "",
            f" More text for article {a} : {'word ' * (a + 3)}\n",
        ]
        rows += article
        articles.append("".join(article))
    return rows, articles


def write_parquet(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), path)


@pytest.fixture
def wikitext_mirror(tmp_path, monkeypatch):
    """A local copy of the hub repo Salesforce/wikitext, files named as on the hub."""
    repo = tmp_path / "mirror" / "Salesforce" / "wikitext"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text(wikitext_card())
    expected = {}
    for split, n in (("train", 12), ("validation", 3), ("test", 4)):
        rows, articles = wikitext_rows(split, n)
        write_parquet(repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet", rows)
        expected[split] = articles
        if split == "train":  # wikitext-103 ships its train split in two shards
            write_parquet(repo / "wikitext-103-raw-v1" / "train-00000-of-00002.parquet", rows[: len(rows) // 2])
            write_parquet(repo / "wikitext-103-raw-v1" / "train-00001-of-00002.parquet", rows[len(rows) // 2 :])
        else:
            write_parquet(repo / "wikitext-103-raw-v1" / f"{split}-00000-of-00001.parquet", rows)
    monkeypatch.setenv("REVDEQ_HUB_MIRROR", str(tmp_path / "mirror"))
    return expected


def test_wikitext_loads_through_the_hub_code_path(wikitext_mirror, monkeypatch):
    calls = []
    real = sources.load_hub_dataset
    monkeypatch.setattr(
        sources,
        "load_hub_dataset",
        lambda location, config, **kw: calls.append((location, config)) or real(location, config, **kw),
    )
    corpus = prepare_corpus("wikitext", tokenizer="byte")
    assert len(calls) == 1 and calls[0][0].endswith("Salesforce/wikitext") and calls[0][1] == "wikitext-2-raw-v1"
    for split, articles in wikitext_mirror.items():
        # The source's own splits, its lines joined back into articles, one per document.
        assert decode_docs(corpus.splits[split]) == articles
        assert corpus.split_bytes[split] == sum(len(a.encode()) for a in articles)
        assert corpus.split_documents[split] == len(articles)
    assert "Salesforce/wikitext" in corpus.source


def test_wikitext_103_reads_every_train_shard(wikitext_mirror):
    corpus = prepare_corpus("wikitext-103", tokenizer="byte")
    assert decode_docs(corpus.splits["train"]) == wikitext_mirror["train"]


def test_hub_id_with_dataset_config(wikitext_mirror):
    corpus = prepare_corpus("Salesforce/wikitext", dataset_config="wikitext-2-raw-v1", tokenizer="byte")
    assert decode_docs(corpus.splits["test"]) == wikitext_mirror["test"]


def test_hub_dataset_with_unknown_config_names_it(wikitext_mirror):
    with pytest.raises(DataError, match="Salesforce/wikitext.*nope"):
        prepare_corpus("Salesforce/wikitext", dataset_config="nope", tokenizer="byte")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_uncached_hub_dataset_offline_fails_fast_with_one_line(how, monkeypatch):
    if how == "flag":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare_corpus("wikitext", tokenizer="byte", offline=(how == "flag"))
    message = str(err.value)
    assert time.perf_counter() - start < 10
    assert "\n" not in message
    assert "Salesforce/wikitext" in message and "offline" in message
    assert "--dataset pydoc" in message and "local path" in message
    if how == "flag":
        assert "(--offline)" in message


def test_offline_flag_alone_keeps_every_library_off_the_network(tmp_path):
    """A fresh process without HF_HUB_OFFLINE: `offline=True` must stop datasets and huggingface_hub from
    trying the Hub (they read their offline setting at import). The endpoint points at a closed local port,
    so a request that slipped through would fail only after retries (20 s or more), never reach the Hub."""
    script = (
        "import time, sys\n"
        "import datasets, transformers.models.auto.tokenization_auto\n"  # imports are not waiting
        "from revdeq_cli.data import DataError, prepare_corpus\n"
        "t = time.perf_counter()\n"
        "for tok in ('byte', 'someone/uncached-tokenizer'):\n"
        "    try:\n"
        "        prepare_corpus('wikitext' if tok == 'byte' else 'pydoc', tokenizer=tok, offline=True)\n"
        "    except DataError as err:\n"
        "        print(err)\n"
        "print(f'{time.perf_counter() - t:.2f}')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env |= {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "ds"),
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    dataset_line, tokenizer_line, seconds = out.stdout.strip().splitlines()
    assert "Salesforce/wikitext" in dataset_line and "(--offline)" in dataset_line
    assert "someone/uncached-tokenizer" in tokenizer_line and "offline" in tokenizer_line
    assert float(seconds) < 10, "offline failures must not wait on the network (retries take 20 s or more)"


def test_dataset_config_is_only_for_hub_datasets(tmp_path):
    with pytest.raises(DataError, match="--dataset-config 'x' applies to hub datasets only"):
        prepare_corpus("pydoc", dataset_config="x")


def test_progress_reports_each_stage():
    seen = []
    prepare_corpus("pydoc", tokenizer="bpe:300", progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("train tokenizer", 69, 69) in seen and ("tokenize", 79, 79) in seen
    seen.clear()
    prepare_corpus("pydoc", tokenizer="bpe:300", progress=lambda *a: seen.append(a))
    assert seen == []  # a cache hit does no work worth reporting


def test_unreachable_hub_counts_as_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "offline_reason", lambda offline: "the Hugging Face Hub is unreachable")
    with pytest.raises(DataError, match="unreachable; pass a local path"):
        prepare_corpus("someone/some-dataset", tokenizer="byte")


def test_hub_dataset_with_only_train_and_another_text_column(tmp_path, monkeypatch):
    """A hub repo as `push_to_hub` lays it out (data/train-*.parquet): missing splits are carved by hash."""
    docs = [f"note {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(150)]
    (tmp_path / "someone" / "notes" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"body": docs}), tmp_path / "someone/notes/data/train-00000-of-00001.parquet")
    monkeypatch.setenv("REVDEQ_HUB_MIRROR", str(tmp_path))
    with pytest.raises(DataError, match=r"someone/notes.*no 'text' field \(columns: body\)"):
        prepare_corpus("someone/notes", tokenizer="byte")
    corpus = prepare_corpus("someone/notes", tokenizer="byte", text_field="body")
    assert_hash_split(corpus, docs)


# --- local files --------------------------------------------------------------------------------------

DOCS = [f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(20 + i % 13)) for i in range(120)]


def split_of_docs(corpus) -> dict[str, list[str]]:
    return {split: decode_docs(corpus.splits[split]) for split in ("train", "validation", "test")}


def assert_hash_split(corpus, docs: list[str]) -> None:
    """Every document in exactly the split its hash names, none lost, none duplicated."""
    got = split_of_docs(corpus)
    for split, members in got.items():
        assert sorted(members) == sorted(d for d in docs if hash_split(d) == split)
    assert sum(len(m) for m in got.values()) == len(docs)


def test_jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
    assert_hash_split(prepare_corpus(str(path), tokenizer="byte"), DOCS)


def test_jsonl_with_another_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS))
    assert_hash_split(prepare_corpus(str(path), tokenizer="byte", text_field="content"), DOCS)


def test_parquet_file(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), path)
    assert_hash_split(prepare_corpus(str(path), tokenizer="byte"), DOCS)


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_text_file_paragraphs_are_documents(tmp_path, suffix):
    path = tmp_path / f"book{suffix}"
    path.write_text("\n\n".join(DOCS) + "\n")
    corpus = prepare_corpus(str(path), tokenizer="byte")
    got = split_of_docs(corpus)
    assert sorted(d.strip() for m in got.values() for d in m) == sorted(DOCS)
    for split, members in got.items():
        assert all(hash_split(d) == split for d in members)


def test_directory_of_mixed_files(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("\n\n".join(DOCS[:40]))
    (tmp_path / "data" / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[40:80]))
    pq.write_table(pa.table({"text": DOCS[80:]}), tmp_path / "data" / "c.parquet")
    (tmp_path / "data" / ".hidden.txt").write_text("never read")
    corpus = prepare_corpus(str(tmp_path / "data"), tokenizer="byte")
    got = split_of_docs(corpus)
    assert sorted(d.strip() for m in got.values() for d in m) == sorted(DOCS)
    assert "3 files" in corpus.source


def test_directory_with_its_own_splits_keeps_them(tmp_path):
    for split, docs in (("train", DOCS[:100]), ("validation", DOCS[100:110]), ("test", DOCS[110:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    got = split_of_docs(prepare_corpus(str(tmp_path), tokenizer="byte"))
    assert got == {"train": DOCS[:100], "validation": DOCS[100:110], "test": DOCS[110:]}


def test_directory_of_text_files_per_split(tmp_path):
    for split, docs in (("train", DOCS[:100]), ("validation", DOCS[100:110]), ("test", DOCS[110:])):
        (tmp_path / f"{split}.txt").write_text("\n\n".join(docs) + "\n")
    got = split_of_docs(prepare_corpus(str(tmp_path), tokenizer="byte"))
    assert {s: [d.strip() for d in m] for s, m in got.items()} == {
        "train": DOCS[:100],
        "validation": DOCS[100:110],
        "test": DOCS[110:],
    }


def test_missing_validation_split_is_carved_from_train_by_hash(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:110]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[110:]))
    got = split_of_docs(prepare_corpus(str(tmp_path), tokenizer="byte"))
    assert got["test"] == DOCS[110:]  # the source's own test split, untouched
    assert got["validation"] == [d for d in DOCS[:110] if hash_split(d) == "validation"]
    assert got["train"] == [d for d in DOCS[:110] if hash_split(d) != "validation"]


def test_split_rule_is_deterministic_and_order_free():
    assert [hash_split(d) for d in DOCS] == [hash_split(d) for d in DOCS]
    counts = {s: sum(hash_split(f"doc {i}") == s for i in range(10_000)) for s in ("train", "validation", "test")}
    assert 8800 < counts["train"] < 9200 and 400 < counts["validation"] < 600 and 400 < counts["test"] < 600


def test_pydoc_is_split_by_topic_name():
    from pydoc_data.topics import topics

    corpus = prepare_corpus("pydoc", tokenizer="byte")
    got = split_of_docs(corpus)
    for split, members in got.items():
        assert sorted(members) == sorted(t for name, t in topics.items() if hash_split(name) == split)
    assert all(len(corpus.splits[s]) > 0 for s in got)


# --- bad input ----------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl.*does not exist"):
        prepare_corpus(str(tmp_path / "nope.jsonl"), tokenizer="byte")
    with pytest.raises(DataError, match="does not exist"):
        prepare_corpus("./no/such/dir", tokenizer="byte")


def test_jsonl_without_text_field_names_file_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*no 'text' field \(fields: body, id\)"):
        prepare_corpus(str(path), tokenizer="byte")


def test_parquet_without_text_column_names_file(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=r"bad\.parquet.*no 'text' field"):
        prepare_corpus(str(path), tokenizer="byte")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare_corpus(str(tmp_path / "empty.txt"), tokenizer="byte")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    with pytest.raises(DataError, match="blank.txt.*no text"):
        prepare_corpus(str(tmp_path / "blank.txt"), tokenizer="byte")


def test_corpus_too_small_for_a_split(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("one paragraph only")
    with pytest.raises(DataError, match="tiny.txt.*split is empty"):
        prepare_corpus(str(path), tokenizer="byte")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match="corpus.csv.*unsupported extension"):
        prepare_corpus(str(path), tokenizer="byte")


def test_hub_probe_answers_quickly_both_ways(monkeypatch):
    """The reachability probe really talks HTTP (a local server stands in for the Hub) and gives up fast."""
    import http.server
    import threading

    from huggingface_hub import constants

    from revdeq_cli.data import hub

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        hub.hub_reachable.cache_clear()
        assert hub.hub_reachable()
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")  # now closed
    hub.hub_reachable.cache_clear()
    start = time.perf_counter()
    assert not hub.hub_reachable()
    assert time.perf_counter() - start < 5
    hub.hub_reachable.cache_clear()
