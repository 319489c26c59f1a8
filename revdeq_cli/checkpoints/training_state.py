"""`training_state.pt`: what `revdeq train` stores beside the weights, and reading it back safely (docs/DESIGN.md §4).

It holds only tensors, numbers, strings, lists and dicts, so it loads with `torch.load(weights_only=True)`:
step, epoch, data position, tokens seen, best validation loss, the run's resolved settings (a nested dict),
and, for resuming, the optimiser / schedule / grad-scaler states and every RNG state. Checkpoints converted
from elsewhere (`revdeq convert`) have none; they still load. Imports torch lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from revdeq_cli.checkpoints.layout import TRAINING_STATE
from revdeq_cli.errors import CheckpointError

# Keys of training_state.pt that only resuming needs; everything else is cheap metadata.
RESUME_KEYS = ("optimizer", "schedule", "scaler", "rng")
# Keys `revdeq train` writes into every training_state.pt -> their types. Reading the metadata needs `step`
# (the others, where present, must have their type); resuming needs every one of them.
STATE_TYPES: dict[str, type] = {"format": int, "step": int, "epoch": int, "micro_index": int, "tokens_seen": int,
                                "settings": dict, "optimizer": dict, "schedule": dict, "scaler": dict, "rng": dict}
REQUIRED_STATE = ("step",)


def load_training_state(checkpoint: str | os.PathLike[str], *, full: bool = True) -> dict[str, Any]:
    """Read `training_state.pt` safely (`weights_only=True`). With `full=False` the resume-only parts
    (optimizer, schedule, scaler, rng) are dropped. Returns {} for a checkpoint without one.

    Checked: the file loads through the weights-only unpickler and holds a dict with `step`; every key of
    `STATE_TYPES` it has is of that type; with `full=True` (resuming) every key of `STATE_TYPES` is there.
    Otherwise `CheckpointError` naming the file."""
    import torch

    path = Path(checkpoint) / TRAINING_STATE
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a corrupt or foreign file: say which one
        raise CheckpointError(f"{path}: cannot read training state ({type(err).__name__}); the file is "
                              "corrupt or not from revdeq: use another checkpoint of the run") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a revdeq training state (it holds a {type(state).__name__}, not a "
                              "dict); use another checkpoint of the run")
    required = STATE_TYPES if full else REQUIRED_STATE
    missing = [key for key in required if key not in state]
    mistyped = [key for key, kind in STATE_TYPES.items() if key in state
                and (not isinstance(state[key], kind) or isinstance(state[key], bool))]
    if missing or mistyped:
        what = "; ".join(([f"lacks {', '.join(missing)}"] if missing else [])
                         + ([f"has {', '.join(mistyped)} of the wrong type"] if mistyped else []))
        fix = ("resume from another checkpoint of the run" if full else
               "use another checkpoint of the run, or delete the file to use the weights without it")
        raise CheckpointError(f"{path}: {what}, so it is not a training state revdeq wrote (damaged or "
                              f"replaced); {fix}")
    if not full:
        state = {k: v for k, v in state.items() if k not in RESUME_KEYS}
    return state
