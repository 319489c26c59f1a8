"""Tokenizers behind `--tokenizer` that work offline: byte, bpe[:SIZE], a local Hugging Face directory."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from revdeq_cli.data import EOS_TOKEN, DataError, byte_tokenizer, prepare_corpus

TEXT = "Plain ASCII, café, 日本語, emoji 🙂 and a literal <|endoftext|> inside."


def test_byte_tokenizer_ids_are_the_utf8_bytes():
    tok = byte_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 257 and tok.eos_token == EOS_TOKEN and tok.eos_token_id == 256
    assert tok.encode("héllo") == list("héllo".encode())
    assert tok.decode(list(TEXT.encode())) == TEXT


def test_byte_fast_path_gives_the_tokenizers_own_ids(tmp_path):
    import numpy as np

    from revdeq_cli.data.tokenizer import encode_documents, is_byte_tokenizer

    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    assert is_byte_tokenizer(tok) and is_byte_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    texts = [TEXT, "", "\x00\x7f\n\t\r", "ÿ" * 3 + "\udc80".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
    fast = encode_documents(tok, texts, np.dtype(np.uint16), as_bytes=True)
    slow = encode_documents(tok, texts, np.dtype(np.uint16), as_bytes=False)
    assert fast.dtype == slow.dtype == np.uint16 and fast.tolist() == slow.tolist()
    assert (fast == 256).sum() == len(texts)


def test_byte_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)  # no revdeq code involved
    assert again.encode(TEXT) == tok.encode(TEXT) and again.eos_token_id == 256 and len(again) == 257


def test_literal_end_of_text_in_a_document_stays_text(tmp_path):
    """Only the separators packing inserts are end-of-text tokens."""
    path = tmp_path / "c.jsonl"
    import json

    docs = [f"{i} {TEXT}" for i in range(60)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = prepare_corpus(str(path), tokenizer="byte")
    total = sum(len(corpus.splits[s]) for s in corpus.splits)
    eos = sum(int((corpus.splits[s] == 256).sum()) for s in corpus.splits)
    assert eos == len(docs)
    assert total == sum(len(d.encode()) for d in docs) + len(docs)
    assert sum(corpus.split_bytes.values()) == sum(len(d.encode()) for d in docs)


def test_bpe_is_trained_on_train_split_cached_and_saved_with_the_run(tmp_path, monkeypatch):
    from revdeq_cli.data import corpus as corpus_module

    calls = []
    real = corpus_module.train_bpe_tokenizer
    monkeypatch.setattr(
        corpus_module, "train_bpe_tokenizer", lambda texts, size: calls.append(size) or real(texts, size)
    )
    first = prepare_corpus("pydoc", tokenizer="bpe:1000", tokenizer_dir=tmp_path / "run")
    second = prepare_corpus("pydoc", tokenizer="bpe:1000")
    assert calls == [1000]  # trained once, then read from the cache
    tok = first.tokenizer
    assert len(tok) == 1000 and tok.eos_token == EOS_TOKEN and tok.eos_token_id == 0
    assert second.fingerprint == first.fingerprint
    again = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert again.encode(TEXT) == tok.encode(TEXT)
    # `eval` with the run's copy of the tokenizer finds the same cached tokens.
    assert prepare_corpus("pydoc", tokenizer=str(tmp_path / "run")).fingerprint == first.fingerprint
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level: lossless
    # Fewer tokens than bytes: the merges were learned from this corpus.
    assert len(first.splits["train"]) < 0.5 * first.split_bytes["train"]


def test_bpe_default_size_and_bad_sizes():
    from revdeq_cli.data.tokenizer import parse_bpe_spec

    assert parse_bpe_spec("bpe") == 8192 and parse_bpe_spec("BPE:300") == 300 and parse_bpe_spec("gpt2") is None
    with pytest.raises(DataError, match="at least 257"):
        prepare_corpus("pydoc", tokenizer="bpe:100")


def test_local_tokenizer_directory_such_as_a_checkpoint(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # a checkpoint holds model files beside it
    from_dir = prepare_corpus("pydoc", tokenizer=str(tmp_path / "ckpt"))
    built_in = prepare_corpus("pydoc", tokenizer="byte")
    assert from_dir.fingerprint == built_in.fingerprint  # same tokenizer definition, same cache entry
    for split in built_in.splits:
        assert (from_dir.splits[split] == built_in.splits[split]).all()


def test_directory_without_tokenizer_is_named(tmp_path):
    with pytest.raises(DataError, match="tokenizer path .* holds no loadable tokenizer"):
        prepare_corpus("pydoc", tokenizer=str(tmp_path))


def test_uncached_hub_tokenizer_offline_is_one_line():
    with pytest.raises(DataError) as err:
        prepare_corpus("pydoc", tokenizer="someone/not-a-cached-tokenizer")
    message = str(err.value)
    assert "\n" not in message and "offline" in message and "--tokenizer byte" in message


def test_vocabulary_larger_than_the_model_is_refused():
    with pytest.raises(DataError, match="'byte' has 257 tokens but the model's vocab_size is 200"):
        prepare_corpus("pydoc", tokenizer="byte", max_vocab_size=200)
    with pytest.raises(DataError, match="'bpe:4096' would have 4096 tokens but the model's vocab_size is 1000"):
        prepare_corpus("pydoc", tokenizer="bpe:4096", max_vocab_size=1000)
    assert prepare_corpus("pydoc", tokenizer="byte", max_vocab_size=257).vocab_size == 257
