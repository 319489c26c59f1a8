"""Checkpoints: the run-directory layout, atomic writes, the training state, checking, saving, loading and
describing a checkpoint (docs/DESIGN.md §4). The floor between `model`/`data`/`settings` below and
`training`/`interop`/`cli` above: it imports nothing from those three.

    from revdeq_cli.checkpoints import load_checkpoint, save_checkpoint, open_checkpoint, resolve_checkpoint

Modules: `layout` (names, finding, run-dir naming, resume lookup), `atomic` (atomic writes, a full disk),
`training_state` (training_state.pt), `safetensors_header` (weights headers), `verify` (`open_checkpoint`:
every file checked), `model_dir` (the files of a model directory), `save_load`, `inspection` (`revdeq inspect`).
"""

from revdeq_cli.checkpoints.atomic import (
    DiskFullError,
    atomic_dir,
    atomic_write_text,
    free_bytes,
    is_disk_full,
    remove_stale_temp_dirs,
)
from revdeq_cli.checkpoints.layout import (
    CHECKPOINT_PREFIX,
    TRAINING_STATE,
    checkpoint_name,
    default_run_dir,
    find_resume_checkpoint,
    is_checkpoint_dir,
    list_checkpoints,
    newest_checkpoint_under,
    prune_checkpoints,
    resolve_checkpoint,
)
from revdeq_cli.checkpoints.save_load import LoadedCheckpoint, link_checkpoint, load_checkpoint, save_checkpoint
from revdeq_cli.checkpoints.training_state import load_training_state
from revdeq_cli.checkpoints.verify import CheckpointFiles, open_checkpoint

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINING_STATE",
    "CheckpointFiles",
    "DiskFullError",
    "LoadedCheckpoint",
    "atomic_dir",
    "atomic_write_text",
    "checkpoint_name",
    "default_run_dir",
    "find_resume_checkpoint",
    "free_bytes",
    "is_checkpoint_dir",
    "is_disk_full",
    "link_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_training_state",
    "newest_checkpoint_under",
    "open_checkpoint",
    "prune_checkpoints",
    "remove_stale_temp_dirs",
    "resolve_checkpoint",
    "save_checkpoint",
]
