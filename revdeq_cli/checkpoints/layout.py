"""The run-directory layout: the fixed names, and finding a checkpoint in it (docs/DESIGN.md §4).

    runs/<dataset>-<YYYYmmdd-HHMMSS>/        (default_run_dir)
      config.yaml  logs/  .lock
      checkpoint-000500/ ...                 (checkpoint_name; kept: the newest train.keep_last)
      best/  final/                          (copies of a numbered checkpoint)

A checkpoint is a Hugging Face model directory::

    checkpoint-000500/
      config.json  generation_config.json  model.safetensors   (model_dir.save_model_dir)
      configuration_revdeq.py  modeling_revdeq.py  revdeq_*.py   (generated modeling code, for trust_remote_code)
      tokenizer.json  tokenizer_config.json ...                  (tokenizer.save_pretrained)
      training_state.pt                                          (training_state.py)

Finding is written once, here: `list_checkpoints` (a run dir's numbered checkpoints), `resolve_checkpoint`
(a path given by the user), `newest_checkpoint_under` (the default of `generate`) and
`find_resume_checkpoint` (`train --resume`). No torch.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from revdeq_cli.errors import CheckpointError

TRAINING_STATE = "training_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
RUNS_DIR = Path("runs")


def checkpoint_name(step: int) -> str:
    """`checkpoint-000500` for step 500 (zero-padded so names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"



def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """A complete model directory: config.json plus weights."""
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    )


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete `checkpoint-NNNNNN` dirs in `run_dir` as (step, path), oldest first (temp dirs ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NUMBERED.match(p.name)
        if m and is_checkpoint_dir(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint dir, or a run dir (then its newest `checkpoint-NNNNNN`, else `final/`, else `best/`).

    Raises `CheckpointError` naming the path when there is nothing to load.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory; check the path")
    if is_checkpoint_dir(p):
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint directory (expected config.json and model.safetensors)")
    numbered = list_checkpoints(p)
    if numbered:
        return numbered[-1][1]
    for name in ("final", "best"):
        if is_checkpoint_dir(p / name):
            return p / name
    raise CheckpointError(
        f"{p}: holds no checkpoint (no complete checkpoint-NNNNNN/, final/ or best/ with config.json and "
        "model.safetensors); pass a checkpoint directory"
    )


def prune_checkpoints(run_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` numbered checkpoints (never best/ or final/); return them."""
    doomed = [p for _, p in list_checkpoints(run_dir)[:-keep_last]] if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def newest_checkpoint_under(root: str | os.PathLike[str]) -> Path:
    """The most recently written checkpoint in any run directory under `root` (the default of `generate`):
    the one whose weights file is newest, ties broken by name. `CheckpointError` naming `root` if none."""
    root = Path(root)
    found = []
    if root.is_dir():
        for run in root.iterdir():
            if run.is_dir() and not run.name.startswith("."):
                found += [p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and is_checkpoint_dir(p)]
    if not found:
        raise CheckpointError(f"{root}: no checkpoint found; train one with `revdeq train` or pass "
                              "--checkpoint PATH")
    return max(found, key=lambda p: ((p / WEIGHTS).stat().st_mtime if (p / WEIGHTS).exists() else 0.0, p.name))


# --------------------------------------------------------------------------- run directories and resume
def default_run_dir(dataset: str, now: datetime | None = None) -> Path:
    """runs/<dataset>-<YYYYmmdd-HHMMSS> (a path's stem stands for a local dataset)."""
    name = Path(dataset.rstrip("/")).stem if ("/" in dataset or "." in dataset) else dataset
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    return RUNS_DIR / f"{name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def find_resume_checkpoint(resume: str | None, out_dir: str | None, dataset: str) -> Path | None:
    """Where `--resume` points: None (fresh run), "auto" (the newest checkpoint in `out_dir`, or, with no
    `out_dir`, in the newest runs/<dataset>-* dir; None when there is none yet), or a checkpoint / run
    directory (must exist: `CheckpointError` otherwise)."""
    if resume is None:
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    if out_dir is not None:
        found = list_checkpoints(out_dir)
        return found[-1][1] if found else None
    prefix = default_run_dir(dataset).name.rsplit("-", 2)[0] + "-"
    runs = sorted((p for p in RUNS_DIR.glob(prefix + "*") if list_checkpoints(p)), key=lambda p: p.name)
    return list_checkpoints(runs[-1])[-1][1] if runs else None
