"""Where documents come from: one `--dataset` value names a source.

    pydoc            the English documentation every CPython ships in `pydoc_data.topics` (offline default;
                     one document per topic: 79 topics, about 466 kB of text in CPython 3.11)
    stdlib           the running interpreter's standard library .py sources, test suites, site-packages and
                     __pycache__ left out (offline; one document per file: 731 files, 12.1M characters in
                     CPython 3.11); `$REVDEQ_STDLIB_DIR` names another directory to read instead
    wikitext         hub `Salesforce/wikitext`, config `wikitext-2-raw-v1` (`wikitext-2` is a synonym)
    wikitext-103     hub `Salesforce/wikitext`, config `wikitext-103-raw-v1`
    OWNER/NAME       any hub dataset (config from `--dataset-config`), text in its `text` column
    PATH             a local .txt/.md, .jsonl/.json (records with a `text` field) or .parquet (a `text`
                     column) file; a directory of such files; or a directory laid out like a downloaded
                     hub dataset (a README.md with `configs:`, or files/folders named by split such as
                     train.jsonl, test.jsonl, data/train-*.parquet)

Hub data and local files both load through `datasets.load_dataset`, so its cache, split inference and
dataset cards behave as users know them.

Documents: a row of a hub dataset or of a .jsonl/.parquet file is one document; in .txt/.md files a
paragraph (text between blank lines) is one document; WikiText's rows are lines, so its lines are joined
back into articles, each starting at a top-level heading (" = Title = "). Empty documents are skipped.

Splits: a source's own train/validation/test splits are used as they are ("valid", "val", "dev" count as
validation). A split the source lacks is carved from its train split, document by document: a document
goes to bucket sha256(key) mod 100 — 0..89 train, 90..94 validation, 95..99 test — and leaves train only
if its bucket is a missing split. The key is the document's text (so identical documents share a split),
for pydoc the topic name, for stdlib the file's path relative to the stdlib directory. No document is ever
in two splits, and the rule needs no seed or order. (The two built-in corpora and `hash_split` live in
`revdeq_cli.data.builtin`.)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from revdeq_cli.data.builtin import PydocSource, StdlibSource, hash_split
from revdeq_cli.data.cache import cache_key
from revdeq_cli.data.hub import first_line, hub_offline_mode, mirrored_path, offline_reason
from revdeq_cli.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

SPLITS = ("train", "validation", "test")
HUB_ALIASES = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}
_SPLIT_NAMES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}  # fmt: skip
_TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet"}
_SUFFIXES = _TEXT_SUFFIXES | _JSON_SUFFIXES | _PARQUET_SUFFIXES
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")
_BATCH_ROWS = 1000


class Source(Protocol):
    """A corpus: a description, a cheap-as-possible content fingerprint, and its documents."""

    description: str

    def fingerprint(self) -> str: ...

    def documents(self) -> Iterator[tuple[str, str]]:
        """(split, text) for every non-empty document, split in SPLITS."""
        ...


def train_texts(source: Source) -> Iterator[str]:
    """The training split's documents (what a BPE tokenizer is trained on)."""
    return (text for split, text in source.documents() if split == "train")


class DatasetSource:
    """Documents from a `datasets.DatasetDict`, loaded lazily by `load`.

    `fingerprint_hint` (e.g. local file sizes and mtimes) lets a cache hit skip loading; without it the
    fingerprint comes from the datasets' own fingerprints, which needs the (cached) load.
    """

    def __init__(
        self,
        description: str,
        load: Callable[[], DatasetDict],
        *,
        text_field: str = "text",
        wikitext_articles: bool = False,
        fingerprint_hint: object = None,
    ) -> None:
        self.description = description
        self._load = load
        self._dataset: DatasetDict | None = None
        self.text_field = text_field
        self.wikitext_articles = wikitext_articles
        self.fingerprint_hint = fingerprint_hint

    def dataset(self) -> DatasetDict:
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def fingerprint(self) -> str:
        options = (self.text_field, self.wikitext_articles)
        if self.fingerprint_hint is not None:
            return cache_key("files", self.fingerprint_hint, options)
        data = self.dataset()
        return cache_key("datasets", sorted((name, ds._fingerprint) for name, ds in data.items()), options)

    def _splits(self) -> dict[str, str]:
        """Canonical split name -> the source's split name."""
        found: dict[str, str] = {}
        for name in self.dataset():
            canon = _SPLIT_NAMES.get(name.lower())
            if canon is not None and canon not in found:
                found[canon] = name
        if "train" not in found:
            raise DataError(
                f"dataset {self.description} has no train split (splits: {', '.join(self.dataset()) or 'none'})"
            )
        return found

    def documents(self) -> Iterator[tuple[str, str]]:
        splits = self._splits()
        for canon in SPLITS:
            if canon not in splits:
                continue
            for text in self._texts(self.dataset()[splits[canon]]):
                if canon == "train":
                    bucket = hash_split(text)
                    yield (bucket if bucket not in splits else "train"), text
                else:
                    yield canon, text

    def _texts(self, ds: Dataset) -> Iterator[str]:
        field = self.text_field
        if field not in ds.column_names:
            raise DataError(
                f"dataset {self.description}: no '{field}' field (columns: {', '.join(ds.column_names)}); "
                "choose the column holding the text with text_field (setting data.text_field)"
            )
        rows = (row for batch in ds.select_columns([field]).iter(batch_size=_BATCH_ROWS) for row in batch[field])
        texts = _join_wikitext_articles(rows) if self.wikitext_articles else rows
        for text in texts:
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"dataset {self.description}: field '{field}' holds {type(text).__name__}, not text")
            if text.strip():
                yield text


def _join_wikitext_articles(lines: Iterable[str | None]) -> Iterator[str]:
    """WikiText rows are lines (each ending in "\\n", blank lines empty); an article starts at a
    top-level heading line " = Title = ". Yields whole articles."""
    article: list[str] = []
    for line in lines:
        line = line or ""
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in article):
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)


# --- hub ------------------------------------------------------------------------------------------------


def load_hub_dataset(
    location: str, config: str | None, *, label: str, offline_why: str | None, **builder_kwargs: object
) -> DatasetDict:
    """`datasets.load_dataset(location, config)` with its failures turned into one-line DataErrors.
    `location` is a hub id, or a local directory laid out like a hub repository (loaded offline)."""
    import datasets

    local = Path(location).is_dir()  # a local copy never needs the network
    with hub_offline_mode(local or offline_why is not None):
        try:
            data = datasets.load_dataset(location, config, **builder_kwargs)
        except (ConnectionError, FileNotFoundError) as err:
            if offline_why is not None and not local:
                raise DataError(
                    f"dataset {label} is not in the Hugging Face cache and {offline_why}; "
                    "pass a local path (--dataset PATH) or use --dataset pydoc or stdlib (offline)"
                ) from None
            raise DataError(f"dataset {label}: {first_line(err)}; check the name, or pass a local path") from None
        except ValueError as err:
            raise DataError(f"dataset {label}: {first_line(err)} (set --dataset-config)") from None
    if not isinstance(data, datasets.DatasetDict):
        raise DataError(f"dataset {label} did not load as a dataset with splits")
    return data


def hub_source(repo_id: str, config: str | None, *, text_field: str, offline: bool) -> DatasetSource:
    mirror = mirrored_path(repo_id)
    location = str(mirror) if mirror is not None else repo_id
    label = f"'{repo_id}'" + (f" (config {config})" if config else "")
    why = None if mirror is not None else offline_reason(offline)
    return DatasetSource(
        f"{repo_id}" + (f" {config}" if config else "") + (f" from {mirror}" if mirror else ""),
        lambda: load_hub_dataset(location, config, label=label, offline_why=why),
        text_field=text_field,
        wikitext_articles=repo_id.split("/")[-1].lower() == "wikitext",
    )


# --- local files ----------------------------------------------------------------------------------------


def _has_dataset_card_configs(readme: Path) -> bool:
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    parts = text.split("\n---", 1)
    try:
        meta = yaml.safe_load(parts[0].lstrip("-")) if len(parts) == 2 else None
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and ("configs" in meta or "dataset_info" in meta)


def _is_hub_layout(directory: Path) -> bool:
    """A README.md dataset card with configs, or files/folders named by split (datasets' own rules)."""
    readme = directory / "README.md"
    if readme.is_file() and _has_dataset_card_configs(readme):
        return True
    from datasets.data_files import get_data_patterns

    try:
        patterns = get_data_patterns(str(directory))
    except Exception:  # datasets raises EmptyDatasetError and friends when nothing matches
        return False
    return any(_SPLIT_NAMES.get(str(name).lower()) in ("validation", "test") for name in patterns)


def _corpus_files(directory: Path) -> list[Path]:
    files = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in _SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    if not files:
        raise DataError(f"dataset directory '{directory}' holds no .txt, .md, .jsonl, .json or .parquet files")
    return files


def _check_text_field(path: Path, field: str) -> None:
    """Fail early, naming the file, when a .jsonl/.parquet file has no `field` (reads one record)."""
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as err:
            raise DataError(f"dataset file '{path}' is not a readable parquet file ({first_line(err)})") from None
    elif suffix in _JSON_SUFFIXES:
        names = _first_json_record_keys(path)
        if names is None:
            return
    else:
        return
    if field not in names:
        raise DataError(
            f"dataset file '{path}' has no '{field}' field (fields: {', '.join(names) or 'none'}); "
            f"put each document's text under '{field}'"
        )


def _first_json_record_keys(path: Path) -> list[str] | None:
    """Keys of the first record of a JSON-lines file (or of a .json file holding one array)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(1 << 16).lstrip()
        if not head:
            return None
        try:
            if head.startswith("["):
                records = json.loads(head + handle.read())
                record = records[0] if records else None
            else:
                record = json.loads(head.splitlines()[0] if "\n" in head else head + handle.readline())
        except json.JSONDecodeError as err:
            raise DataError(f"dataset file '{path}' is not JSON lines ({first_line(err)})") from None
    if record is None:
        return None
    if not isinstance(record, dict):
        raise DataError(f"dataset file '{path}': records must be JSON objects with a text field")
    return list(record)


def _load_files(files: list[Path], text_field: str) -> DatasetDict:
    """Load files of mixed formats with `datasets`, keeping only the text column, as one train split."""
    import datasets

    groups = {
        "text": [f for f in files if f.suffix.lower() in _TEXT_SUFFIXES],
        "json": [f for f in files if f.suffix.lower() in _JSON_SUFFIXES],
        "parquet": [f for f in files if f.suffix.lower() in _PARQUET_SUFFIXES],
    }
    parts = []
    with hub_offline_mode(True):  # local files never need the network
        for builder, group in groups.items():
            if not group:
                continue
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in group], split="train", **kwargs)
            if builder == "text" and text_field != "text":
                ds = ds.rename_column("text", text_field)
            ds = ds.select_columns([text_field])
            parts.append(ds.cast_column(text_field, datasets.Value("string")))
    return datasets.DatasetDict({"train": datasets.concatenate_datasets(parts)})


def local_source(path: Path, config: str | None, *, text_field: str) -> DatasetSource:
    if path.is_dir() and _is_hub_layout(path):
        data_files = [p for p in path.rglob("*") if p.is_file() and p.name != "README.md" and ".cache" not in p.parts]
        # Plain-text splits: paragraphs are documents here too (datasets' default would make every line one).
        kwargs = {"sample_by": "paragraph"} if all(p.suffix.lower() == ".txt" for p in data_files) else {}
        return DatasetSource(
            f"{path} (hub layout{', config ' + config if config else ''})",
            lambda: load_hub_dataset(str(path), config, label=f"'{path}'", offline_why=None, **kwargs),
            text_field=text_field,
        )
    _no_config(str(path), config)
    if path.is_dir():
        files = _corpus_files(path)
    elif path.suffix.lower() in _SUFFIXES:
        files = [path]
    else:
        raise DataError(f"dataset file '{path}' has an unsupported extension; use .txt, .md, .jsonl, .json or .parquet")
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"dataset '{path}' is empty")
    for f in files:
        _check_text_field(f, text_field)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return DatasetSource(
        f"{path} ({len(files)} file{'s' if len(files) != 1 else ''})",
        lambda: _load_files(files, text_field),
        text_field=text_field,
        fingerprint_hint=stats,
    )


# --- resolution -----------------------------------------------------------------------------------------


def _no_config(spec: str, config: str | None) -> None:
    if config:
        raise DataError(f"--dataset-config '{config}' applies to hub datasets only, not to '{spec}'; drop it")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or os.sep in spec.rstrip(os.sep).split(os.sep, 1)[-1]  # more than one separator: hub ids have one
        or Path(spec).suffix.lower() in _SUFFIXES
    )


def resolve_source(
    dataset: str, *, dataset_config: str | None = None, text_field: str = "text", offline: bool = False
) -> Source:
    """Turn a `--dataset` value into a Source (nothing is loaded or downloaded yet, except that a hub id
    may probe whether the Hub is reachable)."""
    spec = dataset.strip()
    if not spec:
        raise DataError("--dataset is empty; use pydoc, stdlib, wikitext, a hub id or a local path")
    if spec.lower() == "pydoc":
        _no_config(spec, dataset_config)
        return PydocSource()
    if spec.lower() == "stdlib":
        _no_config(spec, dataset_config)
        return StdlibSource()
    if spec.lower() in HUB_ALIASES:
        repo_id, default_config = HUB_ALIASES[spec.lower()]
        return hub_source(repo_id, dataset_config or default_config, text_field=text_field, offline=offline)
    path = Path(spec).expanduser()
    if path.exists():
        return local_source(path, dataset_config, text_field=text_field)
    if _looks_like_path(spec) or not _HUB_ID.match(spec):
        raise DataError(f"dataset path '{spec}' does not exist (nor is it a hub id); check the path")
    return hub_source(spec, dataset_config, text_field=text_field, offline=offline)
