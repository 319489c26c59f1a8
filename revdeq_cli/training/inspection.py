"""Describe a checkpoint without loading its model: what `revdeq inspect` shows.

    report = describe_checkpoint("runs/pydoc-.../")    # a checkpoint dir, a run dir, or a model.safetensors

Everything comes from small reads: `config.json`, the safetensors header (names, shapes, dtypes; no tensor
data), `training_state.pt` through the weights-only unpickler (resume-only parts dropped), and the run's
TensorBoard scalars. Parameter counts are exact: the header lists every stored tensor, and a tied output
head is stored once, as `num_parameters_split()` counts it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revdeq_cli.errors import CheckpointError
from revdeq_cli.interop.safetensors_header import SafetensorsHeader, TensorInfo, read_safetensors_header
from revdeq_cli.training.checkpoint import load_training_state, resolve_checkpoint

MODEL_TYPE = "revdeq"
# Our model's tensor names (revdeq_cli.model.modeling); anything else in the weights is not ours.
_OUR_NAMES = re.compile(r"^(wte|wpe|ln_f|lm_head)\.(weight|bias)$|^blocks\.\d+\.[a-z_0-9.]+$")
EMBEDDING_TENSORS = ("wte.weight", "wpe.weight")


@dataclass
class CheckpointReport:
    """What a checkpoint holds. `training` is empty for a converted model directory."""

    path: Path  # the checkpoint directory (or the weights file's directory)
    config: dict[str, Any]
    tensors: list[TensorInfo]
    parameters: dict[str, int]  # total / embedding / non_embedding
    dtypes: dict[str, int]  # dtype -> elements stored in it
    files: list[tuple[str, int]]  # (name, bytes) of the directory's files
    training: dict[str, Any] = field(default_factory=dict)  # step, epoch, tokens_seen, best_val_loss, ...
    settings: dict[str, Any] = field(default_factory=dict)  # the run's resolved settings (nested)
    recent: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__


def describe_checkpoint(path: str | Path, *, recent: int = 5) -> CheckpointReport:
    """Read what `path` (checkpoint dir, run dir, or a .safetensors file) holds; `CheckpointError` naming
    the file at fault if it is missing, corrupt, truncated or not a revdeq model."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        directory, weight_files = path.parent, [path]
        config = _read_config(directory / "config.json") if (directory / "config.json").is_file() else {}
    else:
        directory = resolve_checkpoint(path)
        config = _read_config(directory / "config.json")
        weight_files = _weight_files(directory)
    headers = [read_safetensors_header(f) for f in weight_files]
    tensors = [t for h in headers for t in h.tensors]
    _check_ours(weight_files[0] if len(weight_files) == 1 else directory, tensors)
    total = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if t.name in EMBEDDING_TENSORS)
    dtypes: dict[str, int] = {}
    for h in headers:
        for name, n in h.dtypes().items():
            dtypes[name] = dtypes.get(name, 0) + n
    state = load_training_state(directory, full=False) if path.is_dir() else {}
    settings = state.pop("settings", None)
    report = CheckpointReport(
        path=directory, config=config, tensors=tensors,
        parameters={"total": total, "embedding": embedding, "non_embedding": total - embedding},
        dtypes=dtypes, files=sorted((p.name, p.stat().st_size) for p in directory.iterdir() if p.is_file()),
        training=state, settings=settings if isinstance(settings, dict) else {},
        metadata=_merged_metadata(headers),
    )
    run_dir = directory.parent
    if recent and (run_dir / "logs").is_dir():
        report.recent = recent_scalars(run_dir / "logs", last=recent, up_to_step=state.get("step"))
    return report


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (expected a Hugging Face config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.__class__.__name__}); the file is corrupt") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object (expected a Hugging Face config.json)")
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}; "
                              "this is not a revdeq checkpoint")
    return config


def _weight_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: unreadable shard index (expected model.safetensors or a valid "
                              "model.safetensors.index.json)") from None


def _check_ours(where: Path, tensors: list[TensorInfo]) -> None:
    foreign = [t.name for t in tensors if not _OUR_NAMES.match(t.name)]
    if foreign or not any(t.name == "wte.weight" for t in tensors):
        shown = ", ".join(foreign[:3]) if foreign else "no wte.weight"
        raise CheckpointError(f"{where}: tensors ({shown}{', ...' if len(foreign) > 3 else ''}) are not a revdeq "
                              "model's; expected names like wte.weight and blocks.0.attn.c_attn.weight")


def _merged_metadata(headers: list[SafetensorsHeader]) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in headers:
        out.update(h.metadata)
    return out


def recent_scalars(log_dir: Path, tags: tuple[str, ...] = ("train/loss", "val/loss"), *, last: int = 5,
                   up_to_step: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """The last `last` (step, value) points of each TensorBoard scalar `tag` at steps <= `up_to_step`,
    read with TensorBoard's event reader (no unpickling). {} without event files or if they are damaged."""
    log_dir = Path(log_dir)
    if not any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir()):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    try:
        acc.Reload()
    except Exception:  # noqa: BLE001 - a damaged log must not make inspect fail
        return {}
    available = set(acc.Tags().get("scalars", []))
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in tags:
        if tag in available:
            points: dict[int, float] = {}
            for event in acc.Scalars(tag):  # a resumed run logs some steps twice: keep the latest write
                if up_to_step is None or event.step <= up_to_step:
                    points[event.step] = float(event.value)
            out[tag] = sorted(points.items())[-last:]
    return out
