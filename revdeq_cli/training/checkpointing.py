"""A run's checkpoints: what the trainer saves (rank 0), and how a resumed run restores it.

A checkpoint is taken only at an optimiser-step boundary and records the step, the epoch, the micro-batch index
within the epoch, the optimiser / schedule / scaler state and every RNG state at that boundary (`training_state`),
so a resumed CPU run computes bit for bit the losses the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from revdeq_cli import checkpoints as ckpt
from revdeq_cli.checkpoints.verify import CheckpointFiles
from revdeq_cli.errors import CheckpointError
from revdeq_cli.training.rng import restore_rng_state

STATE_FORMAT = 1


class RunCheckpoints:
    """Rank 0's checkpoints in `run_dir`: `checkpoint-NNNNNN` per saved step (the newest `keep_last` kept), and the
    links `best/` and `final/`. `last_saved` is (step, path) of the newest step checkpoint of this run, if any."""

    def __init__(self, run_dir: Path, model: Any, tokenizer: Any, keep_last: int) -> None:
        self.run_dir, self.model, self.tokenizer, self.keep_last = run_dir, model, tokenizer, keep_last
        self.last_saved: tuple[int, Path] | None = None

    def save(self, name: str, step: int, state: dict[str, Any]) -> Path:
        path = ckpt.save_checkpoint(self.run_dir / name, self.model, self.tokenizer, state)
        if name.startswith(ckpt.CHECKPOINT_PREFIX):
            self.last_saved = (step, path)
            ckpt.prune_checkpoints(self.run_dir, self.keep_last)
        return path

    def saved(self, step: int) -> Path | None:
        """The checkpoint of `step` if this run has saved it (and it still exists)."""
        if self.last_saved is not None and self.last_saved[0] == step and self.last_saved[1].exists():
            return self.last_saved[1]
        return None

    def save_step(self, step: int, state: Callable[[], dict[str, Any]]) -> Path:
        """checkpoint-NNNNNN for `step`, written once; `state()` builds its training state when needed."""
        return self.saved(step) or self.save(ckpt.checkpoint_name(step), step, state())

    def save_best(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """best/: a link to `step`'s checkpoint where there is one, else a checkpoint of its own."""
        if (path := self.saved(step)) is not None:
            ckpt.link_checkpoint(path, self.run_dir / "best")
        else:
            self.save("best", step, state())


def restore(trainer: Any, files: CheckpointFiles) -> None:
    """Continue the run of `files` (opened with `resume=True`: its training state is complete) in `trainer`:
    weights, optimiser, schedule, scaler, RNG states and the run's counters."""
    from safetensors.torch import load_model

    path, state = files.path, files.training_state
    try:
        load_model(trainer.model, str(path / "model.safetensors"), strict=True, device=str(trainer.device))
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"{path}: its weights do not fit the model these settings build ({str(err).splitlines()[0][:160]}); "
            "resume with the run's own settings"
        ) from None
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.schedule.load_state_dict(state["schedule"])
    if state["scaler"] and trainer.scaler.is_enabled():  # empty unless the run used fp16
        trainer.scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    trainer.step, trainer.epoch = int(state["step"]), int(state["epoch"])
    trainer.micro_index, trainer.tokens_seen = int(state["micro_index"]), int(state["tokens_seen"])
    trainer.best_val_loss = state.get("best_val_loss")
    trainer.best_val_step = state.get("best_val_step")
    if trainer.checkpoints is not None and path.parent == trainer.run_dir:
        trainer.checkpoints.last_saved = (trainer.step, path)
    same = state.get("world_size") == trainer.info.world_size and state.get("corpus") == trainer.corpus.fingerprint
    if not same:
        trainer.log("warning: the process count or corpus differs from the checkpoint's run, "
                    "so the data order will not continue exactly")
    trainer.log(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch})")


def training_state(trainer: Any, rng: dict[str, Any]) -> dict[str, Any]:
    """What `training_state.pt` holds for `trainer` at its current step boundary, with the RNG states `rng`
    captured there."""
    return {
        "format": STATE_FORMAT, "step": trainer.step, "epoch": trainer.epoch, "micro_index": trainer.micro_index,
        "tokens_seen": trainer.tokens_seen, "total_steps": trainer.total_steps,
        "best_val_loss": trainer.best_val_loss, "best_val_step": trainer.best_val_step,
        "final_val_loss": trainer.final_val_loss,  # the whole validation split, at the run's end (else None)
        "world_size": trainer.info.world_size, "corpus": trainer.corpus.fingerprint,
        "settings": trainer.settings.model_dump(),
        "optimizer": trainer.optimizer.state_dict(), "schedule": trainer.schedule.state_dict(),
        "scaler": trainer.scaler.state_dict(), "rng": rng,
    }
