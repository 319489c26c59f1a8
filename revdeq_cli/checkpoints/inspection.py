"""Describe a checkpoint without loading its model: what `revdeq inspect` shows.

    report = describe_checkpoint("runs/pydoc-.../")    # a checkpoint dir, a run dir, or a model.safetensors

Everything comes from small reads: `config.json`, the safetensors header (names, shapes, dtypes; no tensor
data), `training_state.pt` through the weights-only unpickler (resume-only parts dropped), and the run's
TensorBoard scalars. The files are checked first by `verify.open_checkpoint`, as for every
other command, so a damaged checkpoint is an error naming the damage, not a summary. Parameter counts are
exact: the header lists every stored tensor, and a tied output head is stored once, as
`num_parameters_split()` counts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revdeq_cli.checkpoints.safetensors_header import SafetensorsHeader, TensorInfo, read_safetensors_header
from revdeq_cli.checkpoints.verify import open_checkpoint
from revdeq_cli.errors import CheckpointError

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
    inference_steps: int | None = None  # the DEQ's solver steps in eval mode (RevDEQConfig.eval_max_steps)


def describe_checkpoint(path: str | Path, *, recent: int = 5) -> CheckpointReport:
    """Read what `path` (checkpoint dir, run dir, or a .safetensors file) holds.

    A directory (and a weights file with a config.json beside it) goes through `open_checkpoint`, the
    checks every command runs (weights fit their files and agree with config.json, config fields typed,
    tokenizer files readable, training_state.pt is ours): a damaged checkpoint is a `CheckpointError`
    naming the file at fault, never a clean-looking summary. A lone .safetensors file gets the header
    checks and must hold a revdeq model's tensor names."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".safetensors" and not (path.parent / "config.json").is_file():
        directory, config, state, inference_steps = path.parent, {}, {}, None
        headers = [read_safetensors_header(path)]
        _check_ours(path, [t for h in headers for t in h.tensors])
    else:
        files = open_checkpoint(path.parent if path.is_file() and path.suffix == ".safetensors" else path)
        directory, config, headers = files.path, files.config, files.headers
        state = dict(files.training_state)
        inference_steps = files.model_config.eval_max_steps if files.model_config.is_deq else None
    tensors = [t for h in headers for t in h.tensors]
    total = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if t.name in EMBEDDING_TENSORS)
    dtypes: dict[str, int] = {}
    for h in headers:
        for name, n in h.dtypes().items():
            dtypes[name] = dtypes.get(name, 0) + n
    settings = state.pop("settings", None)
    report = CheckpointReport(
        path=directory, config=config, tensors=tensors,
        parameters={"total": total, "embedding": embedding, "non_embedding": total - embedding},
        dtypes=dtypes, files=sorted((p.name, p.stat().st_size) for p in directory.iterdir() if p.is_file()),
        training=state, settings=settings if isinstance(settings, dict) else {},
        metadata=_merged_metadata(headers), inference_steps=inference_steps,
    )
    run_dir = directory.parent
    if recent and (run_dir / "logs").is_dir():
        report.recent = recent_scalars(run_dir / "logs", last=recent, up_to_step=state.get("step"))
    return report


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
