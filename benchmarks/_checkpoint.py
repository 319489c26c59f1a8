"""What the checkpoint diagnostics (`inference_beta.py`, `residual_positions.py`) start from: a saved model, the
settings it trained with, and its corpus's validation split read offline from the local cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CheckpointWithData:
    """`model` in eval mode, `settings` (the run's), `meta` (`load_checkpoint`'s), `corpus` (tokenised with
    the checkpoint's own tokenizer) and `seq_len`, the window length it trained at (at most its context)."""

    model: Any
    settings: Any
    meta: dict[str, Any]
    corpus: Any
    seq_len: int

    @property
    def validation(self) -> list[int]:
        return self.corpus.splits["validation"]


def load_checkpoint_with_data(path: Path, *, threads: int = 1) -> CheckpointWithData:
    """Load `path` (a run directory or saved model with its training settings) and its validation data;
    `threads` torch threads (1: the figures do not depend on what else the machine runs)."""
    import torch

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus

    torch.set_num_threads(threads)
    model, _, settings, meta = load_checkpoint(path)
    if settings is None:
        raise SystemExit(f"{meta['path']}: no training settings saved beside it, so its dataset is unknown")
    model.eval()
    data = settings.data
    corpus = prepare_corpus(data.dataset, dataset_config=data.dataset_config, tokenizer=str(meta["path"]),
                            offline=True, cache_dir=data.cache_dir)
    return CheckpointWithData(model, settings, meta, corpus, min(data.seq_len, model.config.max_position_embeddings))
