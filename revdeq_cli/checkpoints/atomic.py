"""Atomic writes into a run directory, and what a full disk looks like (docs/DESIGN.md §4).

Everything goes into a hidden temp dir (or file) beside the target, which is renamed into place only once
complete (`atomic_dir`, `atomic_write_text`). A crash mid-write leaves at most a `.NAME.tmp-*` dir that
nothing reads and the next run removes (`remove_stale_temp_dirs`); it never replaces or damages the previous
good checkpoint. A write that fails because the disk is full removes its temp dir and raises `DiskFullError`
(torch and safetensors report it as their own errors, so `is_disk_full` looks at the whole chain and at the
space left).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from revdeq_cli.errors import CheckpointError
from revdeq_cli.formatting import format_bytes


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
    return DiskFullError(f"{directory}: the disk is full ({format_bytes(free_bytes(directory))} free) while writing "
                         f"{what}; nothing was left half-written. Free some space or write elsewhere",
                         directory=directory, what=what)


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
