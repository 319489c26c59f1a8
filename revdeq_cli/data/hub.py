"""Talking to the Hugging Face Hub, or deciding not to.

Offline when any of these holds: the `offline` argument (`--offline`), `HF_HUB_OFFLINE=1` (or
`HF_DATASETS_OFFLINE` / `TRANSFORMERS_OFFLINE`), or a 3-second probe of the Hub endpoint fails. Offline,
hub datasets and tokenizers come only from the local Hugging Face caches, and a miss is one `DataError`
line instead of minutes of retries.

`REVDEQ_HUB_MIRROR=DIR` resolves hub ids against a local directory laid out like the hub (`DIR/<owner>/<name>/`
holding the repository's files, e.g. `DIR/Salesforce/wikitext/wikitext-2-raw-v1/train-00000-of-00001.parquet`
plus its README.md). Air-gapped sites and the tests use it; everything after the lookup is the same code.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

HUB_MIRROR_ENV = "REVDEQ_HUB_MIRROR"
_TRUE = {"1", "true", "yes", "on"}


def env_offline() -> bool:
    """Whether the environment asks for offline mode (read now, not at import)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick request to the Hub endpoint (through the proxies huggingface_hub is configured with)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:
        return False
    return True


def offline_reason(offline: bool) -> str | None:
    """Why the Hub must not be contacted, or None when it may be."""
    if offline:
        return "offline mode (--offline)"
    if env_offline():
        return "offline mode (HF_HUB_OFFLINE)"
    if not hub_reachable():
        return "the Hugging Face Hub is unreachable"
    return None


@contextlib.contextmanager
def hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Make `datasets`, `huggingface_hub` and `transformers` act offline inside the block. They read
    HF_HUB_OFFLINE once at import, so the flag is set on their modules and restored afterwards."""
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def mirrored_path(repo_id: str) -> Path | None:
    """The local copy of hub repository `repo_id` under $REVDEQ_HUB_MIRROR, if there is one."""
    root = os.environ.get(HUB_MIRROR_ENV)
    if not root:
        return None
    path = Path(root).expanduser() / repo_id
    return path if path.is_dir() else None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line errors that quote a library's reason."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
