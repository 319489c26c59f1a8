"""`prepare_corpus`: a source plus a tokenizer -> cached, memory-mapped token arrays per split.

Each split is its documents' ids, every document followed by the end-of-text token, stored once under
`<cache>/tokens/<key>/<split>.bin` (raw little-endian uint16 when the vocabulary has <= 65535 tokens,
else uint32) with `meta.json` beside them. The key covers the source's content fingerprint, the
tokenizer's full definition and the storage format, so a changed file or tokenizer makes a new entry
and an unchanged one is reused: later runs only map the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from revdeq_cli.data.cache import build_entry, cache_key, resolve_cache_dir
from revdeq_cli.data.hub import hub_offline_mode, offline_reason
from revdeq_cli.data.packing import TokenBlocks, eval_batches, pack_blocks
from revdeq_cli.data.sources import SPLITS, Source, resolve_source, train_texts
from revdeq_cli.data.tokenizer import (
    byte_tokenizer,
    check_vocab_fits,
    encode_documents,
    is_byte_tokenizer,
    load_pretrained_tokenizer,
    parse_bpe_spec,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from revdeq_cli.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

FORMAT_VERSION = 1
Progress = Callable[[str, int, int | None], None]
"""progress(stage, done, total): stage is "train tokenizer" or "tokenize"; done counts documents; total
is None while unknown and equals done in the last call of a stage. Not called on a cache hit."""

_FLUSH_CHARS = 4_000_000  # encode in batches of about this many characters


@dataclass(frozen=True)
class PreparedCorpus:
    """A tokenised corpus, ready for packing.

    splits: "train"/"validation"/"test" -> 1-D read-only memmap of ids (uint16 or uint32), documents
      each followed by `eos_token_id`.
    split_bytes: UTF-8 bytes of each split's documents (separators not counted), for bits per byte:
      bpb = (mean loss in nats per target) * tokens / bytes / ln 2.
    split_documents: number of documents per split.
    """

    tokenizer: PreTrainedTokenizerFast
    splits: dict[str, np.ndarray]
    split_bytes: dict[str, int]
    split_documents: dict[str, int]
    vocab_size: int
    eos_token_id: int
    source: str
    fingerprint: str
    cache_path: Path

    def blocks(self, split: str, seq_len: int) -> TokenBlocks:
        """Training blocks of one split (see `pack_blocks`)."""
        return pack_blocks(self.splits[split], seq_len, name=f"the {split} split of {self.source}")

    def eval_batches(
        self, split: str, seq_len: int, batch_size: int, *, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches covering the whole split (see `eval_batches`)."""
        return eval_batches(self.splits[split], seq_len, batch_size, max_batches=max_batches)


def prepare_corpus(
    dataset: str = "pydoc",
    *,
    dataset_config: str | None = None,
    tokenizer: str = "byte",
    offline: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_vocab_size: int | None = None,
    text_field: str = "text",
    progress: Progress | None = None,
) -> PreparedCorpus:
    """Resolve `dataset` and `tokenizer` (see `sources` and `tokenizer`), tokenise every split once into
    the cache, and map the result. `tokenizer_dir`, if given, receives a copy of the tokenizer
    (`save_pretrained`), so a run directory carries what `generate` and `eval` need. `max_vocab_size`
    (the model's vocab_size) is checked before any tokenising. Raises DataError for bad input."""
    root = resolve_cache_dir(cache_dir)
    source = resolve_source(dataset, dataset_config=dataset_config, text_field=text_field, offline=offline)
    source_fp = source.fingerprint()
    tok = _resolve_tokenizer(tokenizer, source, source_fp, root, offline, max_vocab_size, progress)
    check_vocab_fits(tok, tokenizer, max_vocab_size)
    key = cache_key("tokens", FORMAT_VERSION, source_fp, tokenizer_fingerprint(tok))
    entry = build_entry(root, "tokens", key, lambda tmp: _tokenize_into(tmp, source, tok, progress))
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    splits = {
        name: np.memmap(entry / f"{name}.bin", dtype=meta["dtype"], mode="r", shape=(info["tokens"],))
        for name, info in meta["splits"].items()
    }
    if tokenizer_dir is not None:
        tok.save_pretrained(str(tokenizer_dir))
    return PreparedCorpus(
        tokenizer=tok,
        splits=splits,
        split_bytes={name: info["bytes"] for name, info in meta["splits"].items()},
        split_documents={name: info["documents"] for name, info in meta["splits"].items()},
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        source=source.description,
        fingerprint=key,
        cache_path=entry,
    )


def _resolve_tokenizer(
    spec: str,
    source: Source,
    source_fp: str,
    root: Path,
    offline: bool,
    max_vocab_size: int | None,
    progress: Progress | None,
) -> PreTrainedTokenizerFast:
    spec = spec.strip()
    if spec.lower() == "byte":
        return byte_tokenizer()
    size = parse_bpe_spec(spec)
    if size is not None:
        if max_vocab_size is not None and size > max_vocab_size:
            raise DataError(
                f"tokenizer '{spec}' would have {size} tokens but the model's vocab_size is {max_vocab_size}; "
                f"use bpe:{max_vocab_size} or a larger model vocab_size"
            )

        def train(tmp: Path) -> None:
            texts = _counted(train_texts(source), "train tokenizer", progress)
            train_bpe_tokenizer(texts, size).save_pretrained(str(tmp))

        entry = build_entry(root, "tokenizers", cache_key("bpe", FORMAT_VERSION, source_fp, size), train)
        return load_pretrained_tokenizer(str(entry), local_only=True)
    if Path(spec).expanduser().exists():
        return load_pretrained_tokenizer(spec, local_only=True)
    why = offline_reason(offline)
    with hub_offline_mode(why is not None):
        return load_pretrained_tokenizer(spec, local_only=why is not None)


def _counted(texts: Iterator[str], stage: str, progress: Progress | None) -> Iterator[str]:
    done = 0
    for done, text in enumerate(texts, 1):  # noqa: B007 - `done` is read after the loop
        yield text
        if progress is not None and done % 1000 == 0:
            progress(stage, done, None)
    if progress is not None:
        progress(stage, done, done)


def _tokenize_into(directory: Path, source: Source, tok: PreTrainedTokenizerFast, progress: Progress | None) -> None:
    """Write <split>.bin and meta.json for every split of `source` into `directory`."""
    eos = tok.eos_token_id
    dtype = np.dtype(np.uint16 if len(tok) <= 65535 else np.uint32).newbyteorder("<")
    as_bytes = is_byte_tokenizer(tok)
    stats = {name: {"tokens": 0, "bytes": 0, "documents": 0} for name in SPLITS}
    pending: dict[str, list[str]] = {name: [] for name in SPLITS}
    with ExitStack() as stack:
        files = {name: stack.enter_context(open(directory / f"{name}.bin", "wb")) for name in SPLITS}

        def flush() -> None:
            for name, texts in pending.items():
                if not texts:
                    continue
                ids = encode_documents(tok, texts, dtype, as_bytes=as_bytes)
                files[name].write(ids.tobytes())
                stats[name]["tokens"] += len(ids)
                stats[name]["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
                stats[name]["documents"] += len(texts)
                texts.clear()

        chars = done = 0
        for split, text in source.documents():
            pending[split].append(text)
            chars += len(text)
            done += 1
            if chars >= _FLUSH_CHARS:
                flush()
                chars = 0
                if progress is not None:
                    progress("tokenize", done, None)
        flush()
        if progress is not None:
            progress("tokenize", done, done)
    total = sum(s["documents"] for s in stats.values())
    if total == 0:
        raise DataError(f"dataset {source.description} has no text (every document is empty)")
    for name in SPLITS:
        if stats[name]["tokens"] == 0:
            raise DataError(
                f"dataset {source.description}: the {name} split is empty ({total} documents in all); "
                "add documents, or give the data its own train/validation/test files"
            )
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.str,
        "source": source.description,
        "eos_token_id": eos,
        "vocab_size": len(tok),
        "splits": stats,
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
