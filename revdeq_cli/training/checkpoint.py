"""Checkpoint directories: write them atomically, find the newest one, load them back.

A checkpoint is a Hugging Face model directory (DESIGN §4)::

    checkpoint-000500/
      config.json  generation_config.json  model.safetensors   (model_dir.save_model_dir)
      configuration_revdeq.py  modeling_revdeq.py  revdeq_*.py   (generated modeling code, for trust_remote_code)
      tokenizer.json  tokenizer_config.json ...                  (tokenizer.save_pretrained)
      training_state.pt                                          (this module; torch.save of plain data)

`training_state.pt` holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`: step, epoch, data position, tokens seen, best validation loss, the run's
resolved settings (a nested dict), and, for resuming, the optimiser / schedule / grad-scaler states and every
RNG state. Checkpoints converted from elsewhere (`revdeq convert`) have no training_state.pt; they still load.

Writes are atomic: everything goes into a hidden temp dir beside the target, which is renamed into place
only once complete (`atomic_dir`). A crash mid-write leaves at most a `.NAME.tmp-*` dir that nothing reads
and the next run removes; it never replaces or damages the previous good checkpoint. A write that fails
because the disk is full removes its temp dir and raises `DiskFullError` (torch and safetensors report it as
their own errors, so `is_disk_full` looks at the whole chain and at the space left).

Used by `revdeq train` (saving, `--resume`) and by generate / eval / inspect (`resolve_checkpoint`,
`load_checkpoint`). Imports torch lazily so the CLI can import this module cheaply.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from revdeq_cli.errors import CheckpointError

if TYPE_CHECKING:
    from revdeq_cli.settings import Settings

TRAINING_STATE = "training_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")
# Keys of training_state.pt that only resuming needs; everything else is cheap metadata.
RESUME_KEYS = ("optimizer", "schedule", "scaler", "rng")
# Keys `revdeq train` writes into every training_state.pt -> their types. Reading the metadata needs `step`
# (the others, where present, must have their type); resuming needs every one of them.
STATE_TYPES: dict[str, type] = {"format": int, "step": int, "epoch": int, "micro_index": int, "tokens_seen": int,
                                "settings": dict, "optimizer": dict, "schedule": dict, "scaler": dict, "rng": dict}
REQUIRED_STATE = ("step",)


def checkpoint_name(step: int) -> str:
    """`checkpoint-000500` for step 500 (zero-padded so names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


# --------------------------------------------------------------------------- a full disk
class DiskFullError(CheckpointError):
    """A write into `directory` (of `what`, e.g. `checkpoint-000040`) failed for want of space; nothing was left
    half-written. `revdeq train` replaces the message by its own (`run_dir.disk_full_message`)."""

    def __init__(self, message: str, *, directory: Path | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.directory, self.what = directory, what


_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "storagefull", "filesystemquotaexceeded")
# Below this much free space a failed write is taken for a full disk: torch.save reports ENOSPC as a bare
# RuntimeError ("unexpected pos ..."), and the write that failed has used up what was left.
LOW_SPACE_BYTES = 1 << 20


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Space left to this user on the filesystem of `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return -1


def is_disk_full(err: BaseException, directory: str | os.PathLike[str] | None = None) -> bool:
    """Whether `err` (an Exception, not Ctrl-C) comes from a full disk or quota: ENOSPC / EDQUOT or their text
    anywhere in its chain, or, given the `directory` written to, less than `LOW_SPACE_BYTES` left there."""
    if not isinstance(err, Exception):
        return False
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _FULL_ERRNOS):
            return True
        text = str(e).lower()
        if any(t in text or t in text.replace(" ", "") for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return directory is not None and 0 <= free_bytes(directory) < LOW_SPACE_BYTES


def _disk_full_error(directory: Path, what: str) -> DiskFullError:
    from revdeq_cli.training.progress import format_bytes

    return DiskFullError(f"{directory}: the disk is full ({format_bytes(free_bytes(directory))} free) while writing "
                         f"{what}; nothing was left half-written. Free some space or write elsewhere",
                         directory=directory, what=what)


# --------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success it replaces `target` by rename.

    On any exception (Ctrl-C included) the temp dir is deleted and `target` is untouched; a full disk is then
    raised as `DiskFullError`. Replacing an existing `target` (e.g. `best/`) renames the old one aside first,
    then the new one in, then deletes the old: there is no moment at which a half-written directory carries the
    target's name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException as err:
        full = is_disk_full(err, target.parent)  # measured before the temp dir frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(err, DiskFullError):
            raise _disk_full_error(target.parent, target.name) from err
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file via a temp file and `os.replace` (readers see the old or the new file, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException as err:
        full = is_disk_full(err, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full and not isinstance(err, DiskFullError):
            raise _disk_full_error(path.parent, path.name) from err
        raise


def remove_stale_temp_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete leftovers of writes that crashed (`.NAME.tmp-*`, `.NAME.old-*`) in `run_dir`; return them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------- saving
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

    from revdeq_cli.training.model_dir import save_model_dir

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


# --------------------------------------------------------------------------- finding
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


# --------------------------------------------------------------------------- loading
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

    Every file is checked first by `checkpoint_files.open_checkpoint` (weights, config, tokenizer files,
    training_state.pt), so a damaged checkpoint is one `CheckpointError` naming the file, before anything
    is built. The model comes back in eval mode on `device` (default CPU) in `dtype` (default: as saved);
    the tokenizer (None when the dir has none) always has a pad token (its end-of-text token unless it has
    one) and its `model_max_length` is the model's context, and a model config without `pad_token_id` is
    given the tokenizer's. `meta` holds step, epoch,
    tokens_seen, best_val_loss, ... (empty for converted checkpoints) and "path", the resolved checkpoint
    directory. Nothing is unpickled: weights via safetensors, state via weights_only.
    """
    from revdeq_cli.model import RevDEQForCausalLM
    from revdeq_cli.settings import settings_from_dict
    from revdeq_cli.training.checkpoint_files import open_checkpoint

    files = open_checkpoint(path)
    ckpt = files.path
    try:
        model = RevDEQForCausalLM.from_pretrained(ckpt, dtype=dtype) if dtype is not None \
            else RevDEQForCausalLM.from_pretrained(ckpt)
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
