"""Tokenizers behind one `--tokenizer` value.

    "byte"         built in, no download: ids 0..255 are the UTF-8 bytes themselves, 256 is `<|endoftext|>`
                   (vocabulary 257). Lossless on any text.
    "bpe[:SIZE]"   a byte-level BPE trained with the `tokenizers` library on the training split of the
                   corpus (SIZE tokens in all, default 8192, at least 257). Id 0 is `<|endoftext|>`, ids
                   1..256 the byte alphabet, then the merges. A small corpus may stop short of SIZE.
                   Trained once per (corpus, SIZE) and cached; `prepare_corpus` also saves it with the run.
    HF id or path  anything `AutoTokenizer.from_pretrained` loads (`gpt2` is the paper's); a checkpoint
                   directory works too, since the tokenizer travels inside every checkpoint.

Every tokenizer returned is a `PreTrainedTokenizerFast` with an `eos_token` and a `pad_token` (the
end-of-text token unless the tokenizer brings its own pad token), so batched, padded generation works on
any saved checkpoint; byte and bpe tokenizers pad on the left, as batched generation with a causal model
needs. `save_pretrained(dir)` then `AutoTokenizer.from_pretrained(dir)` gives it back without any revdeq code.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from revdeq_cli.data.hub import first_line
from revdeq_cli.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_SIZE = 8192
_BPE_SPEC = re.compile(r"^bpe(?::(\d+))?$")


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (what the `tokenizers`
    ByteLevel pre-tokenizer emits), so a byte-level vocabulary can name every byte. Cached (callers only
    read it): building it costs as much as the rest of a cache hit."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _wrap(backend) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    # A very large model_max_length: corpora are encoded whole and cut into blocks afterwards. The pad token
    # is the end-of-text token, padding on the left (what batched generation from a causal model needs);
    # neither changes the ids a text encodes to, so `tokenizer_fingerprint` (and every cache) is unchanged.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   padding_side="left", model_max_length=int(1e30))


def ensure_pad_token(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give `tok` a pad token if it has none: its end-of-text token (the usual choice for causal models).
    A pad token it already has is kept. Returns `tok` (changed in place)."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def with_context(tok: PreTrainedTokenizerFast, context: int) -> PreTrainedTokenizerFast:
    """A shallow copy of `tok` whose `model_max_length` is `context`: the tokenizer to save beside a model
    declaring `context` positions (evaluation harnesses and pipelines read it as the window). `tok` keeps its
    own (the corpus tokenizers' is unbounded: corpora are encoded whole and cut into blocks afterwards)."""
    import copy

    out = copy.copy(tok)
    out.model_max_length = int(context)
    return out


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in byte tokenizer: id = byte value for 0..255, `<|endoftext|>` = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges every byte is its own token, so splitting only costs time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    return _wrap(backend)


def train_bpe_tokenizer(texts: Iterable[str], size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `size` tokens (special token and byte alphabet included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def parse_bpe_spec(spec: str) -> int | None:
    """`"bpe"` -> 8192, `"bpe:4096"` -> 4096, anything else -> None. Sizes below 257 are a DataError."""
    match = _BPE_SPEC.match(spec.strip().lower())
    if match is None:
        return None
    size = int(match.group(1)) if match.group(1) else DEFAULT_BPE_SIZE
    if size < 257:
        raise DataError(f"tokenizer '{spec}': a byte-level BPE needs at least 257 tokens (256 bytes + end-of-text)")
    return size


def load_pretrained_tokenizer(spec: str, *, local_only: bool) -> PreTrainedTokenizerFast:
    """Load a Hugging Face tokenizer by hub id or local directory; `local_only` forbids downloads."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    is_path = Path(spec).expanduser().exists()
    try:
        tok = AutoTokenizer.from_pretrained(
            str(Path(spec).expanduser()) if is_path else spec, local_files_only=local_only or is_path
        )
    except (OSError, ValueError, KeyError) as err:
        if is_path:
            raise DataError(f"tokenizer path '{spec}' holds no loadable tokenizer ({first_line(err)})") from None
        where = "offline and not in the Hugging Face cache" if local_only else "not found on the Hugging Face Hub"
        raise DataError(
            f"tokenizer '{spec}' is {where}; use --tokenizer byte or bpe (no download), or a local tokenizer directory"
        ) from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer '{spec}' has no fast (tokenizers-library) version; pick another tokenizer")
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer '{spec}' has no end-of-text (eos) token to join documents with; pick another")
    return ensure_pad_token(tok)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A hash of everything that decides the ids a tokenizer produces (its full `tokenizer.json`)."""
    blob = tok.backend_tokenizer.to_str() + f"|eos={tok.eos_token_id}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def check_vocab_fits(tok: PreTrainedTokenizerFast, spec: str, max_vocab_size: int | None) -> None:
    if max_vocab_size is not None and len(tok) > max_vocab_size:
        raise DataError(
            f"tokenizer '{spec}' has {len(tok)} tokens but the model's vocab_size is {max_vocab_size}; "
            f"set model vocab_size >= {len(tok)} or choose a smaller tokenizer"
        )


def is_byte_tokenizer(tok: PreTrainedTokenizerFast) -> bool:
    """Whether `tok` is (a saved copy of) the built-in byte tokenizer, whose ids are the bytes."""
    return tokenizer_fingerprint(tok) == _byte_fingerprint()


@functools.cache
def _byte_fingerprint() -> str:
    return tokenizer_fingerprint(byte_tokenizer())


def encode_documents(tok: PreTrainedTokenizerFast, texts: list[str], dtype: np.dtype, *, as_bytes: bool) -> np.ndarray:
    """The ids of `texts`, each followed by the end-of-text id, as one 1-D array of `dtype`.

    No special tokens are added and none are recognised inside a text: a document that happens to
    contain "<|endoftext|>" is encoded as plain text, so the only end-of-text tokens are the separators.
    `as_bytes=True` (only for the byte tokenizer, see `is_byte_tokenizer`) takes the UTF-8 bytes
    directly, which gives the same ids about a hundred times faster.
    """
    eos = np.array([tok.eos_token_id], dtype=dtype)
    if as_bytes:
        return np.concatenate([part for t in texts for part in (np.frombuffer(t.encode("utf-8"), np.uint8), eos)])
    backend = tok.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = previous
    ids: list[int] = []
    for encoding in encodings:
        ids.extend(encoding.ids)
        ids.append(tok.eos_token_id)
    return np.asarray(ids, dtype=dtype)
