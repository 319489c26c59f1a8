"""Saving a checkpoint directory and loading one back (docs/DESIGN.md §4).

    save_checkpoint(run_dir / checkpoint_name(step), model, tokenizer, training_state)
    model, tokenizer, settings, meta = load_checkpoint("runs/pydoc-.../")

Saving is atomic (`atomic.atomic_dir`); loading opens the directory through `verify.open_checkpoint`, so
every file is checked before anything is built. Used by `revdeq train` (saving) and by generate / eval /
inspect / convert (loading). Imports torch lazily so the CLI can import this module cheaply.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from revdeq_cli.checkpoints.atomic import atomic_dir
from revdeq_cli.checkpoints.layout import TRAINING_STATE
from revdeq_cli.errors import CheckpointError

if TYPE_CHECKING:
    from revdeq_cli.settings import Settings


def save_checkpoint(
    target: str | os.PathLike[str],
    model: Any,
    tokenizer: Any | None,
    training_state: Mapping[str, Any] | None,
) -> Path:
    """Write a complete checkpoint directory at `target`, atomically; return its path.

    `model` is a (unwrapped) `RevDEQForCausalLM`: `save_model_dir` writes config.json (with `auto_map`),
    generation_config.json (the sampling defaults of `revdeq generate`), model.safetensors, the generated
    modeling code and the tokenizer files. `training_state` is torch.save'd as is, so it
    must hold only plain data (see the module docstring).
    """
    import torch

    from revdeq_cli.checkpoints.model_dir import save_model_dir

    target = Path(target)
    with atomic_dir(target) as tmp:
        save_model_dir(tmp, model, tokenizer)
        if training_state is not None:
            torch.save(dict(training_state), tmp / TRAINING_STATE)
    return target


def link_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Make `target` (e.g. `final/`) a copy of the checkpoint `source`, atomically. Files are hard-linked
    where the filesystem allows (checkpoint files are never modified in place, so sharing them is safe)."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target = Path(target)
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
    return target



class LoadedCheckpoint(NamedTuple):
    """What `load_checkpoint` returns; unpacks as `model, tokenizer, settings, meta`."""

    model: Any  # RevDEQForCausalLM, in eval mode
    tokenizer: Any | None  # PreTrainedTokenizerFast, or None when the dir has no tokenizer files
    settings: Settings | None  # the run's resolved settings, or None (e.g. a converted checkpoint)
    meta: dict[str, Any]  # training_state.pt without the resume-only parts, plus "path"


def load_checkpoint(
    path: str | os.PathLike[str], *, device: Any = None, dtype: Any = None
) -> LoadedCheckpoint:
    """Load a checkpoint dir or a run dir (its newest checkpoint, see `resolve_checkpoint`).

    Every file is checked first by `verify.open_checkpoint` (weights, config, tokenizer files,
    training_state.pt), so a damaged checkpoint is one `CheckpointError` naming the file, before anything
    is built. The model comes back in eval mode on `device` (default CPU) in `dtype` (default: as saved);
    the tokenizer (None when the dir has none) always has a pad token (its end-of-text token unless it has
    one) and its `model_max_length` is the model's context, and a model config without `pad_token_id` is
    given the tokenizer's. `meta` holds step, epoch,
    tokens_seen, best_val_loss, ... (empty for converted checkpoints) and "path", the resolved checkpoint
    directory. Nothing is unpickled: weights via safetensors, state via weights_only.
    """
    from revdeq_cli.checkpoints.verify import open_checkpoint
    from revdeq_cli.model import RevDEQForCausalLM
    from revdeq_cli.settings import settings_from_dict

    files = open_checkpoint(path)
    ckpt = files.path
    try:
        # config.json was parsed and checked once, by open_checkpoint: the model is built from that object.
        config = copy.deepcopy(files.model_config)
        model = RevDEQForCausalLM.from_pretrained(ckpt, config=config, dtype=dtype) if dtype is not None \
            else RevDEQForCausalLM.from_pretrained(ckpt, config=config)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        if isinstance(err, CheckpointError):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{ckpt}: cannot load the model ({reason}); use another checkpoint") from None
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = _load_tokenizer(ckpt) if files.has_tokenizer else None
    if tokenizer is not None:  # the window it declares is the model's context (older checkpoints: unbounded)
        tokenizer.model_max_length = model.config.max_position_embeddings
    if tokenizer is not None and model.config.pad_token_id is None:  # a checkpoint saved without a pad token
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    meta = dict(files.training_state)
    stored = meta.get("settings")
    settings = settings_from_dict(stored, f"{ckpt / TRAINING_STATE}") if isinstance(stored, dict) else None
    meta["path"] = str(ckpt)
    return LoadedCheckpoint(model, tokenizer, settings, meta)


def _load_tokenizer(ckpt: Path) -> Any:
    """The checkpoint's tokenizer (files already checked), with a pad token (see `ensure_pad_token`)."""
    from transformers import AutoTokenizer

    from revdeq_cli.data.tokenizer import ensure_pad_token

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{ckpt / 'tokenizer_config.json'}: the tokenizer does not load ({reason}); "
                              "copy the checkpoint again or save the tokenizer it was trained with") from None
    return ensure_pad_token(tokenizer)

