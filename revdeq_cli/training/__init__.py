"""Training: the loop, optimiser and schedule, evaluation, generation, progress display, TensorBoard, DDP.
Checkpoints live one floor below, in `revdeq_cli.checkpoints` (re-exported here and in `training.checkpoint`).

    from revdeq_cli.training import train, Trainer, TrainSummary, TrainingDivergedError
    from revdeq_cli.training.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, atomic_dir
"""

from revdeq_cli.training.checkpoint import (
    LoadedCheckpoint,
    atomic_dir,
    load_checkpoint,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)
from revdeq_cli.training.loop import Trainer, TrainingDivergedError, TrainSummary, find_resume_checkpoint, train

__all__ = [
    "LoadedCheckpoint",
    "TrainSummary",
    "Trainer",
    "TrainingDivergedError",
    "atomic_dir",
    "find_resume_checkpoint",
    "load_checkpoint",
    "load_training_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
