"""The on-disk cache for tokenised corpora and trained tokenizers.

Layout under `resolve_cache_dir()`:

    tokens/<key>/        meta.json + one raw token file per split (train.bin, validation.bin, test.bin)
    tokenizers/<key>/    a trained tokenizer, as `save_pretrained` writes it
    locks/<kind>-<key>.lock  advisory locks, so two processes building the same entry take turns

An entry is built in a temporary directory beside its final place, flushed to disk (fsync) and renamed
into place, so an entry that exists is complete: a crash leaves at most a `.tmp-*` directory (removed
by the next build of that entry), never a half-written entry. When two processes build the same entry,
the second waits on the lock and then finds the entry made; where locks are unavailable the loser of
the rename discards its own copy (both copies are identical).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere the atomic rename alone keeps entries whole.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "REVDEQ_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The revdeq cache root: `cache_dir` if given, else `$REVDEQ_CACHE_DIR`, else
    `platformdirs.user_cache_dir("revdeq")`. The directory is created if missing."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or None
    if cache_dir is None:
        import platformdirs

        cache_dir = platformdirs.user_cache_dir("revdeq")
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*parts: Any) -> str:
    """A short stable hex key for a JSON-serialisable description of an entry."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_entry(root: Path, kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return `root/kind/key`, building it first with `build(tmp_dir)` if it does not exist yet.

    `build` writes the entry's files into an empty temporary directory; on success that directory is
    renamed to the final path in one step. If `build` raises, nothing is left behind and the error
    propagates.
    """
    final = root / kind / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root / "locks" / f"{kind}-{key}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        if fcntl is not None:  # holding the lock, any earlier temporary copy of this key is a crash's leftover
            for stale in final.parent.glob(f".tmp-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
        try:
            build(tmp)
            _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a lock-free race; the winner's copy is equal
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(final.parent)
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (a rename); not possible on every platform, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
