"""Packing: no token lost or duplicated across blocks, no padding in the loss, evaluation covers the tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revdeq_cli.data import IGNORE_INDEX, DataError, eval_batches, num_eval_batches, pack_blocks, prepare_corpus

CASES = [(n, t) for n in (2, 3, 17, 64, 65, 66, 1000, 1001) for t in (1, 4, 16, 64) if n >= t + 1]


def tokens(n: int, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 257, size=n).astype(dtype)


@pytest.mark.parametrize(("n", "seq_len"), CASES)
def test_training_blocks_target_every_token_once_and_drop_only_the_tail(n, seq_len):
    toks = tokens(n)
    blocks = pack_blocks(toks, seq_len)
    full = blocks[:]
    assert full.dtype == torch.int64 and full.shape == (len(blocks), seq_len + 1) == blocks.shape
    # Targets are positions 1.. of the stream, each once and in order; inputs are what precedes them.
    targets = full[:, 1:].reshape(-1).numpy()
    inputs = full[:, :-1].reshape(-1).numpy()
    covered = len(blocks) * seq_len
    np.testing.assert_array_equal(targets, toks[1 : covered + 1])
    np.testing.assert_array_equal(inputs, toks[:covered])
    assert n - 1 - covered < seq_len  # only an incomplete tail is dropped


def test_blocks_index_like_a_long_tensor():
    toks = tokens(100)
    blocks = pack_blocks(toks, 8)
    assert len(blocks) == 12 and blocks.size(0) == 12 and blocks.size() == (12, 9)
    np.testing.assert_array_equal(blocks[3].numpy(), toks[24:33])
    np.testing.assert_array_equal(blocks[-1].numpy(), toks[88:97])
    picked = blocks[torch.tensor([5, 0, 5])]
    assert picked.shape == (3, 9) and torch.equal(picked[0], picked[2]) and torch.equal(picked[1], blocks[0])
    assert torch.equal(blocks[np.array([1, 2])], blocks[1:3]) and torch.equal(blocks[[1, 2]], blocks[1:3])


@pytest.mark.parametrize(("n", "seq_len"), CASES)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_eval_batches_cover_every_target_exactly_once(n, seq_len, batch_size):
    toks = tokens(n)
    seen_inputs, seen_targets, batches = [], [], 0
    for inputs, targets in eval_batches(toks, seq_len, batch_size):
        batches += 1
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.shape == targets.shape and inputs.shape[1] == seq_len and 1 <= inputs.shape[0] <= batch_size
        real = targets != IGNORE_INDEX
        # Padding only at the right end of a row, and padded inputs are never scored.
        assert torch.equal(real, real.cummin(dim=1).values)
        seen_targets.append(targets[real])
        seen_inputs.append(inputs[real])
    assert batches == num_eval_batches(toks, seq_len, batch_size)
    np.testing.assert_array_equal(torch.cat(seen_targets).numpy(), toks[1:])
    np.testing.assert_array_equal(torch.cat(seen_inputs).numpy(), toks[:-1])


def test_eval_max_batches_stops_early():
    assert len(list(eval_batches(tokens(1000), 16, 4, max_batches=2))) == 2


def test_padding_never_reaches_the_loss():
    toks = tokens(21)
    ((inputs, targets),) = list(eval_batches(toks, 8, 4))
    assert (targets == IGNORE_INDEX).sum() == 3 * 8 - 20  # three windows, 20 targets
    logits = torch.randn(*targets.shape, 300)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), reduction="sum")
    only_real = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="sum")
    torch.testing.assert_close(loss, only_real)


def test_corpus_smaller_than_one_block_is_a_clear_error():
    with pytest.raises(
        DataError, match="the train split of .* has 10 tokens, fewer than one block of seq_len \\+ 1 = 11"
    ):
        pack_blocks(tokens(10), 10, name="the train split of my.txt")
    corpus = prepare_corpus("pydoc", tokenizer="byte")
    with pytest.raises(DataError, match="validation split of pydoc"):
        corpus.blocks("validation", 10**7)


def test_uint32_tokens_pack_too():
    toks = tokens(50, np.uint32) + 70_000
    assert pack_blocks(toks, 7)[0].tolist() == toks[:8].tolist()


def test_prepared_corpus_blocks_have_no_padding():
    corpus = prepare_corpus("pydoc", tokenizer="byte")
    blocks = corpus.blocks("train", 128)
    assert len(blocks) == (len(corpus.splits["train"]) - 1) // 128
    assert int(blocks[:].max()) < corpus.vocab_size
