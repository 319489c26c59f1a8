"""Moved to `revdeq_cli.checkpoints` (issue 19); the names are re-exported here for older imports."""

from revdeq_cli.checkpoints import (  # noqa: F401
    CHECKPOINT_PREFIX,
    TRAINING_STATE,
    CheckpointFiles,
    DiskFullError,
    LoadedCheckpoint,
    atomic_dir,
    atomic_write_text,
    checkpoint_name,
    default_run_dir,
    find_resume_checkpoint,
    free_bytes,
    is_checkpoint_dir,
    is_disk_full,
    link_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_training_state,
    newest_checkpoint_under,
    open_checkpoint,
    prune_checkpoints,
    remove_stale_temp_dirs,
    resolve_checkpoint,
    save_checkpoint,
)
from revdeq_cli.errors import CheckpointError  # noqa: F401
