"""Cutting a split's token stream into model inputs.

A split is one 1-D array of ids: its documents, each followed by the end-of-text token. Nothing is ever
padded into the training loss, and evaluation scores every target of a split exactly once.

Training (`pack_blocks`): blocks of `seq_len + 1` tokens with stride `seq_len`, so consecutive blocks
share one boundary token: block i holds tokens[i*T : i*T + T + 1], the model reads block[:-1] and
predicts block[1:]. Every token but the first is a target exactly once; only the incomplete tail
(fewer than T targets, at most T - 1 tokens) is dropped.

Evaluation (`eval_batches`): the same non-overlapping windows, plus the tail as a final short window
padded on the right. Padded targets are -100 (ignored by the loss); padded inputs are 0, which cannot
affect real positions because attention is causal and the padding comes after them. Each window starts
without context (no sliding window), so perplexity is that of T-token windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from revdeq_cli.errors import DataError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


class TokenBlocks:
    """The training blocks of a token array, read lazily: indexing returns `torch.int64` tensors.

    `blocks[i]` -> LongTensor [seq_len + 1]; `blocks[idx]` (slice, list, numpy or torch index) ->
    LongTensor [k, seq_len + 1]. `len(blocks)` = number of blocks; `blocks.shape` like a tensor's.
    The tokens stay in their compact (memory-mapped) dtype; only the rows asked for are copied.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        n_blocks = (len(tokens) - 1) // seq_len
        step = tokens.strides[0]
        # A zero-copy [n_blocks, seq_len + 1] view with row stride seq_len tokens.
        self.view = np.lib.stride_tricks.as_strided(
            tokens, shape=(n_blocks, seq_len + 1), strides=(seq_len * step, step), writeable=False
        )

    def __len__(self) -> int:
        return self.view.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.view.shape

    def size(self, dim: int | None = None) -> int | tuple[int, int]:
        return self.view.shape if dim is None else self.view.shape[dim]

    def __getitem__(self, index: int | slice | list[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch

        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(np.asarray(self.view[index], dtype=np.int64))

    def __repr__(self) -> str:
        return f"TokenBlocks(n_blocks={len(self)}, seq_len={self.seq_len}, dtype={self.tokens.dtype})"


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")


def pack_blocks(tokens: np.ndarray, seq_len: int, *, name: str = "corpus") -> TokenBlocks:
    """Training blocks [n_blocks, seq_len + 1], stride seq_len (see the module docstring).

    Raises DataError naming `name` when the tokens do not fill one block.
    """
    _check_seq_len(seq_len)
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"{name} has {len(tokens)} tokens, fewer than one block of seq_len + 1 = {seq_len + 1}; "
            "use a smaller --seq-len or a larger corpus"
        )
    return TokenBlocks(tokens, seq_len)


def num_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> int:
    """How many batches `eval_batches` yields."""
    return math.ceil(math.ceil(max(len(tokens) - 1, 0) / seq_len) / batch_size)


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, *, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, targets), both LongTensor [B, seq_len] with B <= batch_size, covering every target
    tokens[1:] exactly once, the tail included; padding has target -100. `max_batches` stops early
    (then the split is not covered: for quick estimates during training only)."""
    _check_seq_len(seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_targets = len(tokens) - 1
    n_windows = math.ceil(max(n_targets, 0) / seq_len)
    import torch

    for batch_index, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            return
        windows = range(first, min(first + batch_size, n_windows))
        inputs = np.zeros((len(windows), seq_len), dtype=np.int64)
        targets = np.full((len(windows), seq_len), IGNORE_INDEX, dtype=np.int64)
        for row, window in enumerate(windows):
            start = window * seq_len
            width = min(seq_len, n_targets - start)
            inputs[row, :width] = tokens[start : start + width]
            targets[row, :width] = tokens[start + 1 : start + 1 + width]
        yield torch.from_numpy(inputs), torch.from_numpy(targets)
