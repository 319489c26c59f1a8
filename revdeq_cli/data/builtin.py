"""The built-in offline corpora: text every Python installation carries, so training works without a network.

    PydocSource     `--dataset pydoc`: the documentation topics in `pydoc_data.topics`, one document per topic
    StdlibSource    `--dataset stdlib`: the standard library's own .py sources, one document per file

Both split their documents by `hash_split` of a name (the topic name; the file's path relative to the stdlib
directory), so no seed is needed and a document's split never depends on which other documents exist.
`hash_split` lives here, not in `sources`, because `sources` imports this module (and re-exports it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from revdeq_cli.data.cache import cache_key
from revdeq_cli.errors import DataError

STDLIB_ENV = "REVDEQ_STDLIB_DIR"
# Directory names never descended into: test suites (test/, tests/, idlelib/idle_test/, lib2to3/tests/ ...),
# third-party packages installed into the stdlib tree, and bytecode caches.
_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def hash_split(key: str) -> str:
    """The split a document with this key belongs to when the source has no splits of its own."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _amount(n: int) -> str:
    """12117233 -> "12.1M", 466000 -> "466k": sizes in descriptions."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


class PydocSource:
    """CPython's bundled documentation topics, one document per topic, split by topic name."""

    def __init__(self) -> None:
        import pydoc_data.topics

        self.topics: dict[str, str] = dict(pydoc_data.topics.topics)
        # The topics live in one module file that only changes with the Python installation: its path, size
        # and modification time identify the content (as make does) without hashing 0.5 MB on every cache hit.
        module = os.stat(pydoc_data.topics.__file__)
        identity = (platform.python_version(), os.path.realpath(pydoc_data.topics.__file__), module.st_size,
                    module.st_mtime_ns)
        self._fingerprint = hashlib.sha256(repr(identity).encode()).hexdigest()[:24]
        size = sum(len(text) for text in self.topics.values())
        self.description = (
            f"pydoc (CPython {platform.python_version()} documentation: {len(self.topics)} topics, "
            f"{size / 1e3:.0f}k characters)"
        )

    def fingerprint(self) -> str:
        return self._fingerprint

    def documents(self) -> Iterator[tuple[str, str]]:
        for name in sorted(self.topics):
            if self.topics[name].strip():
                yield hash_split(name), self.topics[name]


def stdlib_files(root: Path) -> list[Path]:
    """The .py files under `root` outside `_STDLIB_SKIP` directories, sorted by relative POSIX path."""
    found = []
    for directory, subdirs, names in os.walk(root):  # does not follow directory symlinks: no loops
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]
        found += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class StdlibSource:
    """The running interpreter's standard library sources, one document per non-empty .py file, split by
    the file's relative path. `root` defaults to `$REVDEQ_STDLIB_DIR`, else `sysconfig`'s stdlib directory.

    texts: relative POSIX path ("json/decoder.py") -> source text, in path order.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        root = root or os.environ.get(STDLIB_ENV) or sysconfig.get_paths()["stdlib"]
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"stdlib directory '{self.root}' does not exist; set {STDLIB_ENV} to a standard "
                            "library directory, or use another --dataset (e.g. pydoc)")
        self.texts: dict[str, str] = {}
        for path in stdlib_files(self.root):
            try:
                data = path.read_bytes()
            except OSError as err:
                raise DataError(f"stdlib file '{path}' is unreadable ({err.strerror}); use another --dataset") from None
            # Sources are UTF-8 (PEP 3120; CPython 3.11 has no other outside its test suite). A stray byte becomes
            # U+FFFD instead of dropping the file, so the same bytes always give the same documents.
            text = data.decode("utf-8", errors="replace")
            if text.strip():  # empty __init__.py files are no documents
                self.texts[path.relative_to(self.root).as_posix()] = text
        if not self.texts:
            raise DataError(f"stdlib directory '{self.root}' holds no .py files (outside test suites and "
                            "site-packages); use another --dataset (e.g. pydoc)")
        # The text is read anyway (for the character count), so hashing it costs ~30 ms on 12 MB and catches any
        # edit or rename; the Python version and directory are in the key too because the description (kept in
        # meta.json) names them.
        digest = hashlib.sha256()
        for name, text in self.texts.items():
            digest.update(f"{name}\0{len(text)}\0{text}".encode())
        version = f"{platform.python_implementation()} {platform.python_version()}"
        chars = sum(len(text) for text in self.texts.values())
        self._fingerprint = cache_key("stdlib", version, os.path.realpath(self.root), len(self.texts), chars,
                                      digest.hexdigest())
        self.description = (
            f"stdlib ({version} standard library: {len(self.texts)} files, {_amount(chars)} characters "
            f"from {self.root})"
        )

    def fingerprint(self) -> str:
        return self._fingerprint

    def documents(self) -> Iterator[tuple[str, str]]:
        for name, text in self.texts.items():
            yield hash_split(name), text
