"""Measurements of a run: memory, perplexity, and the unigram baseline a language model must beat."""

from __future__ import annotations

import math

import numpy as np
import psutil
import torch


def perplexity(loss: float) -> float:
    """exp(loss), inf past overflow (loss in nats per token)."""
    return math.exp(loss) if loss < 700 else math.inf


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max bytes allocated by tensors since the last `reset_peak_memory` (the caching allocator's
    reserve and the CUDA context excluded). Elsewhere: this process's resident set size (RSS) *now*, not a
    peak: called after an optimiser step, it misses the step's activations (already freed) and includes the
    interpreter and libraries (~390 MiB of torch/transformers for the tiny model on CPU) and the memory the C
    allocator keeps after tensors are freed (glibc's heap grows with freed-but-retained chunks and with
    garbage awaiting Python's cycle collector). The training summary's "peak memory" is the largest of these
    per-step samples."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def memory_kind(device: torch.device) -> str:
    return "cuda max allocated" if device.type == "cuda" else "process RSS"


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `eval_tokens` of the unigram model fitted on `train_tokens`, with add-one
    (Laplace) smoothing over `vocab_size` symbols: the loss of a model that ignores all context. exp() of it
    is the baseline perplexity a trained model should be well below."""
    train_tokens = np.asarray(train_tokens, dtype=np.int64)
    eval_tokens = np.asarray(eval_tokens, dtype=np.int64)
    n = max(vocab_size, int(train_tokens.max(initial=-1)) + 1, int(eval_tokens.max(initial=-1)) + 1)
    counts = np.bincount(train_tokens, minlength=n).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    ev = np.bincount(eval_tokens, minlength=n).astype(np.float64)
    return float(-(ev * logp).sum() / max(1.0, ev.sum()))
