"""The run directory of `revdeq train`: one run per directory, one trainer at a time, a full disk in one line.

    lock = RunLock(run_dir).acquire()       # RunDirBusyError (exit 2) while another trainer holds it
    claim_run_dir(run_dir, continuing=False, overwrite=False)   # RunDirUsedError if another run is there
    ...
    lock.release()

**A used directory.** A directory holds a run when it has any of `RUN_ENTRIES` (config.yaml, logs/, best/,
final/) or a `checkpoint-NNNNNN` entry. A fresh run there would replace some of that run's files and leave the
rest beside its own (so `--resume auto` would mix two runs): it is refused, naming both ways on,
`--resume auto` (continue that run) and `--overwrite` (delete exactly those entries first; files of other
programs, such as a scheduler's log, stay).

**The lock** is `.revdeq.lock` in the run directory. It records the trainer's process id, host and start time,
and the trainer holds an exclusive `flock` on it while it runs. The kernel drops a flock when its process ends,
however it ends (SIGKILL and crashes included), so a lock file left behind is stale and the next trainer takes it
over. Where the filesystem has no flock (some network filesystems) the lock falls back to the process id: a lock
whose process is gone from this host is taken over. Only rank 0 of a torchrun job takes it.

**A full disk.** `disk_full_message` is the one line `revdeq train` prints when a checkpoint (or any write into
the run directory) finds no space: the directory, the free space, the newest complete checkpoint and what would
help. The writes themselves are atomic (`checkpoint.atomic_dir`), so no half checkpoint is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from revdeq_cli import checkpoints as ckpt
from revdeq_cli.checkpoints import atomic
from revdeq_cli.errors import UserError
from revdeq_cli.formatting import format_bytes
from revdeq_cli.training.distributed import DistInfo, broadcast_object

LOCK_NAME = ".revdeq.lock"
RUN_ENTRIES = ("config.yaml", "logs", "best", "final")
# flock is not available on this filesystem: fall back to the process id in the file
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}


class RunDirUsedError(UserError):
    """A fresh run was pointed at a directory that holds another run."""


class RunDirBusyError(UserError):
    """Another trainer holds the run directory's lock; `holder` is its process id (None if unreadable)."""

    def __init__(self, message: str, holder: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder


# --------------------------------------------------------------------------- another run in the directory
def run_entries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The entries of `run_dir` that belong to a revdeq run (see the module docstring), sorted by name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir()
                   if p.name in RUN_ENTRIES or p.name.startswith(ckpt.CHECKPOINT_PREFIX)), key=lambda p: p.name)


def describe_entries(entries: list[Path]) -> str:
    """`config.yaml, logs/, final/ and 3 checkpoints up to checkpoint-000040` (dirs with a slash)."""
    checkpoints = [p.name for p in entries if p.name.startswith(ckpt.CHECKPOINT_PREFIX)]
    named = [p.name + ("/" if p.is_dir() else "") for p in entries if not p.name.startswith(ckpt.CHECKPOINT_PREFIX)]
    if len(checkpoints) == 1:
        named.append(f"{checkpoints[0]}/")
    elif checkpoints:
        named.append(f"{len(checkpoints)} checkpoints up to {checkpoints[-1]}")
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def claim_run_dir(run_dir: str | os.PathLike[str], *, continuing: bool, overwrite: bool) -> str:
    """Make `run_dir` this run's: nothing to do when it holds no run or when this run continues it
    (`continuing`); with `overwrite`, delete the other run's entries and return what they were (`describe_entries`,
    "" when there were none); otherwise raise `RunDirUsedError` (nothing is changed)."""
    entries = [] if continuing else run_entries(run_dir)
    if not entries:
        return ""
    described = describe_entries(entries)
    if not overwrite:
        raise RunDirUsedError(
            f"{run_dir}: holds another run ({described}); continue it with --resume auto "
            f"--out-dir {run_dir}, or start afresh with --overwrite, which deletes that run's files first"
        )
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return described


# --------------------------------------------------------------------------- one trainer at a time
@dataclass(frozen=True)
class LockHolder:
    pid: int | None
    host: str | None
    started: str | None

    def describe(self) -> str:
        if self.pid is None:
            return "a process whose id the lock file does not name"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"process {self.pid}{where}" + (f", since {self.started}" if self.started else "")


def _read_holder(fd: int) -> LockHolder:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    pid = data.get("pid")
    return LockHolder(pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                      data.get("host") if isinstance(data.get("host"), str) else None,
                      data.get("started") if isinstance(data.get("started"), str) else None)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The run directory's lock (see the module docstring). `acquire()` returns self or raises
    `RunDirBusyError`; `took_over` names a stale holder it replaced; `release()` removes the file. Also a
    context manager."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.took_over: LockHolder | None = None
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> RunLock:
        self._made_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirUsedError(f"{self.run_dir}: cannot create the run directory ({err.strerror or err}); give "
                                  "a writable --out-dir") from None
        for _ in range(20):  # the file may be replaced between open() and flock(): then look again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                holder = _read_holder(fd)
                if not self._lock(fd, holder):
                    raise RunDirBusyError(
                        f"{self.run_dir}: another trainer is using this run directory ({holder.describe()}); "
                        "wait for it to finish or stop it"
                        + (f" (kill -TERM {holder.pid} saves a checkpoint)" if holder.pid is not None else "")
                        + f", or give another --out-dir (its lock: {self.path})", holder.pid)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                self._remove_made_dir()
                raise
            if not same:
                os.close(fd)
                continue
            if holder.pid is not None and holder.pid != os.getpid():
                self.took_over = holder
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "revdeq train"}
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            except BaseException:  # e.g. a full disk: hold nothing
                self.release()
                raise
            return self
        raise RunDirBusyError(f"{self.run_dir}: its lock {self.path} keeps being replaced; is another trainer "
                              "starting there? Give another --out-dir", None)

    @staticmethod
    def _lock(fd: int, holder: LockHolder) -> bool:
        """Take the flock without waiting; False when another process holds it. Without flock support: the
        recorded holder decides (a live process on this host keeps it)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
        if holder.pid is None or holder.pid == os.getpid():
            return True
        if holder.host is not None and holder.host != socket.gethostname():
            return False  # cannot tell whether it still runs
        return not process_alive(holder.pid)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(fd)
            self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        """A run that stops before writing anything leaves no empty directory it made for the lock."""
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- a full disk
def disk_full_message(run_dir: Path, *, writing: str | None, save_every: int, keep_last: int) -> str:
    """The one line for a write into `run_dir` that found no space (see the module docstring). The advice on
    `keep_last` counts the checkpoints that fit: a save writes the new one before it prunes the oldest."""
    def size(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())

    free = atomic.free_bytes(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    helps = ["free some space"]
    if save_every > 0:
        helps.append(f"checkpoint less often (--save-every, now {save_every}; 0 saves only at the end)")
    if found:
        step, newest = found[-1]
        each = size(newest)
        kept = (f"the newest complete checkpoint is {newest} (step {step}, {format_bytes(each)}; continue from it "
                f"with --resume auto)")
        fit = int((max(free, 0) + sum(size(p) for _, p in found)) // each) if each else 0
        if 1 <= fit - 1 < keep_last:
            helps.append(f"keep fewer checkpoints (--set train.keep_last={fit - 1}, now {keep_last})")
    else:
        kept = "no complete checkpoint has been written yet"
        if keep_last > 1:
            helps.append(f"keep fewer checkpoints (--set train.keep_last=1, now {keep_last})")
    helps.append("write to another --out-dir")
    return (f"{run_dir}: the disk is full ({format_bytes(free)} free) while writing "
            f"{writing or 'into the run directory'}; nothing was left half-written and {kept}. "
            f"To go on: {', '.join(helps[:-1])} or {helps[-1]}")


# --------------------------------------------------------------------------- what the trainer calls
def claim(run_dir: Path, info: DistInfo, *, continuing: bool, overwrite: bool,
          log: Callable[[str], None]) -> RunLock | None:
    """Rank 0 locks and claims `run_dir` (`RunLock`, `claim_run_dir`) and returns the held lock (None on other
    ranks); if that fails every rank raises its error, so no rank trains into a directory it may not use."""
    lock, removed, error = None, "", None
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
            removed = claim_run_dir(run_dir, continuing=continuing, overwrite=overwrite)
        except Exception as err:  # noqa: BLE001  (every rank raises it below)
            if lock is not None:
                lock.release()
            error = err
    error = broadcast_object(error, info)
    if error is not None:
        raise error
    if lock is not None and lock.took_over is not None:
        log(f"note: {run_dir}: took over the lock of {lock.took_over.describe()}, no longer running")
    if removed:
        log(f"overwrite: deleted the earlier run in {run_dir} ({removed})")
    return lock


def fills_run_dir(run_dir: Path, err: Exception) -> bool:
    """Whether `err` is a write into `run_dir` that found the disk full."""
    if isinstance(err, ckpt.DiskFullError) and err.directory is not None:
        return Path(err.directory).resolve().is_relative_to(run_dir.resolve())
    if not atomic.is_disk_full(err):
        return False
    name = getattr(err, "filename", None)
    if name:
        return Path(name).resolve().is_relative_to(run_dir.resolve())
    return 0 <= atomic.free_bytes(run_dir) < atomic.LOW_SPACE_BYTES


def disk_full_error(run_dir: Path, err: Exception, *, save_every: int, keep_last: int) -> ckpt.DiskFullError:
    """The one-line `DiskFullError` for `err`, a write into `run_dir` that found no space."""
    what = getattr(err, "what", None)
    return ckpt.DiskFullError(disk_full_message(run_dir, writing=what, save_every=save_every, keep_last=keep_last),
                              directory=run_dir, what=what)
