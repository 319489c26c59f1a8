"""Data: dataset sources, tokenizers, packing into blocks, and the token cache.

    corpus = prepare_corpus("pydoc", tokenizer="byte")          # or "wikitext", a hub id, a local path
    blocks = corpus.blocks("train", seq_len=256)                 # LongTensor rows [seq_len + 1]
    for inputs, targets in corpus.eval_batches("validation", 256, batch_size=8): ...

See `sources` (datasets and split rules), `tokenizer` (byte, bpe[:SIZE], Hugging Face), `packing`
(blocks and evaluation windows) and `cache` (where and how tokens are stored).
"""

from revdeq_cli.data.cache import resolve_cache_dir
from revdeq_cli.data.corpus import PreparedCorpus, prepare_corpus
from revdeq_cli.data.packing import IGNORE_INDEX, TokenBlocks, eval_batches, num_eval_batches, pack_blocks
from revdeq_cli.data.sources import HUB_ALIASES, SPLITS, hash_split
from revdeq_cli.data.tokenizer import EOS_TOKEN, byte_tokenizer
from revdeq_cli.errors import DataError

__all__ = [
    "DataError",
    "EOS_TOKEN",
    "HUB_ALIASES",
    "IGNORE_INDEX",
    "PreparedCorpus",
    "SPLITS",
    "TokenBlocks",
    "byte_tokenizer",
    "eval_batches",
    "hash_split",
    "num_eval_batches",
    "pack_blocks",
    "prepare_corpus",
    "resolve_cache_dir",
]
