"""The one way a checkpoint is opened: every file checked before anything uses it (docs/DESIGN.md §4).

    files = open_checkpoint("runs/pydoc-.../")        # a checkpoint dir, or a run dir (its newest checkpoint)
    files = open_checkpoint(path, resume=True)         # `train --resume`: training_state.pt must be complete

`generate`, `eval`, `convert`, `inspect` (through `load_checkpoint` / `describe_checkpoint`) and
`train --resume` all start here, so damage is found once, before any model is built or any file written,
and always becomes one `CheckpointError` line naming the file at fault and what would fix it. What is
checked, in this order (cheap reads only; no tensor data is loaded, nothing is unpickled):

* `config.json`: a JSON object with `model_type` "revdeq"; the fields that fix the tensor shapes
  (`SHAPE_FIELDS`) are present; every field `RevDEQConfig` declares has a value of its declared type
  (an int for `hidden_size`, a bool for `bias`, ...); `RevDEQConfig` accepts the values (its `check()`).
* `generation_config.json`, if present: a JSON object.
* the weights (`model.safetensors`, or the shards named by `model.safetensors.index.json`): each header
  fits its file (`read_safetensors_header`: truncated, random or foreign files are refused), every tensor
  is floating point, and the tensor names and shapes are exactly those of the model `config.json`
  describes (built on the meta device: no memory, no initialisation), a tied output head may be absent.
* tokenizer files: none at all is allowed (a converted model; commands that need a tokenizer say so), but
  if any is there, `tokenizer.json` and `tokenizer_config.json` must both be there and readable, and the
  tokenizer must not have more tokens than the model's `vocab_size`.
* `training_state.pt`, if present (required with `resume=True`): loaded with the weights-only unpickler and
  holding the keys revdeq writes (`load_training_state`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revdeq_cli.checkpoints.layout import CONFIG, TRAINING_STATE, WEIGHTS, WEIGHTS_INDEX, resolve_checkpoint
from revdeq_cli.checkpoints.safetensors_header import SafetensorsHeader, read_safetensors_header
from revdeq_cli.checkpoints.training_state import load_training_state
from revdeq_cli.errors import CheckpointError, UserError

MODEL_TYPE = "revdeq"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG)
# config.json fields that decide the tensors' names and shapes: a checkpoint without them is not ours.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                "num_hidden_layers", "bias", "tie_word_embeddings", "solver")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FIX_COPY = "copy the checkpoint again or use another checkpoint of the run"


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint directory whose files passed every check of this module."""

    path: Path  # the checkpoint directory
    config: dict[str, Any]  # config.json as parsed
    model_config: Any  # the RevDEQConfig it describes, built once here (load_checkpoint builds the model from it)
    weight_files: list[Path]  # model.safetensors, or its shards
    headers: list[SafetensorsHeader]  # one per weight file
    has_tokenizer: bool  # tokenizer.json + tokenizer_config.json present and readable
    training_state: dict[str, Any] = field(default_factory=dict)  # without the resume-only parts; {} if none


def open_checkpoint(path: str | os.PathLike[str], *, resume: bool = False) -> CheckpointFiles:
    """Resolve `path` (a checkpoint dir, or a run dir: its newest checkpoint, see `resolve_checkpoint`) and
    check its files as the module docstring lists. With `resume=True` a training_state.pt with everything
    resuming needs is required. Raises `CheckpointError` (one line naming the file and the fix)."""
    directory = resolve_checkpoint(path)
    config, model_config = read_config(directory / CONFIG)
    if (directory / GENERATION_CONFIG).is_file():
        _read_json_object(directory / GENERATION_CONFIG, "a Hugging Face generation_config.json")
    weight_files = weight_files_of(directory)
    headers = [read_safetensors_header(f) for f in weight_files]
    check_weights_match_config(directory, model_config, headers)
    has_tokenizer = check_tokenizer_files(directory, config)
    if resume and not (directory / TRAINING_STATE).is_file():
        raise CheckpointError(f"{directory / TRAINING_STATE}: missing, so training cannot resume from "
                              f"{directory}; start a new run without --resume, or resume from a checkpoint "
                              "written by `revdeq train`")
    state = load_training_state(directory, full=resume)
    return CheckpointFiles(path=directory, config=config, model_config=model_config, weight_files=weight_files,
                           headers=headers, has_tokenizer=has_tokenizer, training_state=state)


# --------------------------------------------------------------------------- config.json
def read_config(path: Path) -> tuple[dict[str, Any], Any]:
    """Parse `config.json` and check it (module docstring); return it as a dict and as the `RevDEQConfig`
    it describes (built once: the checks, the expected tensors and the model all use that one)."""
    config = _read_json_object(path, "a Hugging Face config.json")
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}; "
                              "this is not a revdeq checkpoint")
    missing = [name for name in SHAPE_FIELDS if name not in config]
    if missing:
        raise CheckpointError(f"{path}: lacks the field(s) {', '.join(missing)}, which fix the model's shapes; "
                              f"restore the original config.json ({_FIX_COPY})")
    for name, kinds in _declared_field_types().items():
        if name in config and not _has_type(config[name], kinds):
            raise CheckpointError(f"{path}: field {name} is {config[name]!r}, not of the declared type "
                                  f"{' or '.join(kinds)}; restore the original config.json ({_FIX_COPY})")
    try:
        model_config = _config_object(config)
    except UserError as err:
        raise CheckpointError(f"{path}: {err} (the file was edited or is damaged; restore the original)") from None
    return config, model_config


def _config_object(config: dict[str, Any]) -> Any:
    from revdeq_cli.model import RevDEQConfig

    return RevDEQConfig.from_dict(dict(config))


def _declared_field_types() -> dict[str, tuple[str, ...]]:
    """RevDEQConfig's own fields -> the simple types their annotations allow ("int", "float", "bool", "str",
    "None", "list"); fields with an annotation not made of those are left out (not checked)."""
    from revdeq_cli.model import RevDEQConfig

    own = vars(RevDEQConfig).get("__annotations__", {})
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(RevDEQConfig):
        if f.name not in own:
            continue
        kinds = tuple("list" if k.strip().startswith("list[") else k.strip() for k in str(f.type).split("|"))
        if all(k in ("int", "float", "bool", "str", "None", "list") for k in kinds):
            out[f.name] = kinds
    return out


def _has_type(value: Any, kinds: tuple[str, ...]) -> bool:
    checks = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "None": lambda v: v is None,
        "list": lambda v: isinstance(v, list),
    }
    return any(checks[k](value) for k in kinds)


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (expected {what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({type(err).__name__}); the file is corrupt: "
                              f"{_FIX_COPY}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object (expected {what}); {_FIX_COPY}")
    return data


# --------------------------------------------------------------------------- weights
def weight_files_of(directory: Path) -> list[Path]:
    """`model.safetensors`, or the shard files a `model.safetensors.index.json` names (each must exist)."""
    single = directory / WEIGHTS
    if single.is_file():
        return [single]
    index = directory / WEIGHTS_INDEX
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        if not names or not all(isinstance(n, str) and "/" not in n for n in names):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: unreadable shard index (expected {WEIGHTS} or a valid "
                              f"{WEIGHTS_INDEX}); {_FIX_COPY}") from None
    return [directory / name for name in names]


def expected_tensors(model_config: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every tensor the model `model_config` (a RevDEQConfig) describes saves, names that
    may be absent because they are tied to another). The model is built on the meta device: no memory, no
    initialisation."""
    import torch

    from revdeq_cli.model import RevDEQForCausalLM

    with torch.device("meta"):
        model = RevDEQForCausalLM(model_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    optional = set(tied) if getattr(model_config, "tie_word_embeddings", False) else set()
    return shapes, optional


def check_weights_match_config(directory: Path, model_config: Any, headers: list[SafetensorsHeader]) -> None:
    """Every stored tensor is floating point and named and shaped as `model_config` (config.json's
    RevDEQConfig) implies; none is missing."""
    config_path = directory / CONFIG
    expected, optional = expected_tensors(model_config)
    stored: dict[str, tuple[tuple[int, ...], Path]] = {}
    for header in headers:
        for t in header.tensors:
            if t.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{header.path}: tensor {t.name} has dtype {t.dtype}, not a floating-point "
                                      f"weight; the file is not a revdeq model's ({_FIX_COPY})")
            stored[t.name] = (t.shape, header.path)
    where = headers[0].path if len(headers) == 1 else directory
    unknown = sorted(name for name in stored if name not in expected)
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise CheckpointError(f"{where}: tensors ({shown}) are not a revdeq model's with this {CONFIG}; expected "
                              f"names like wte.weight and blocks.0.attn.c_attn.weight ({_FIX_COPY})")
    missing = sorted(name for name in expected if name not in stored and name not in optional)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CheckpointError(f"{where}: lacks the tensor(s) {shown} that {config_path} implies; the weights are "
                              f"incomplete or belong to another model ({_FIX_COPY})")
    for name, (shape, path) in stored.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"{config_path}: implies shape {expected[name]} for {name} but {path.name} stores {shape}; the "
                f"config was edited or the files do not belong together: restore the original {CONFIG} "
                f"({_FIX_COPY})")


# --------------------------------------------------------------------------- tokenizer
def check_tokenizer_files(directory: Path, config: dict[str, Any]) -> bool:
    """False when the directory has no tokenizer files at all; True when both are present and readable and
    the tokenizer fits the model's vocabulary; `CheckpointError` otherwise."""
    present = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not present:
        return False
    for name in TOKENIZER_FILES:
        if name not in present:
            raise CheckpointError(f"{directory / name}: missing, though {present[0]} is there (the tokenizer is "
                                  f"incomplete); {_FIX_COPY}, or save the tokenizer the model was trained "
                                  "with into the directory")
    _read_json_object(directory / TOKENIZER_CONFIG, "a Hugging Face tokenizer_config.json")
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(directory / TOKENIZER))
    except Exception as err:  # noqa: BLE001 - the Rust parser raises plain Exception on any damage
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise CheckpointError(f"{directory / TOKENIZER}: unreadable ({reason}); the file is corrupt: "
                              f"{_FIX_COPY}") from None
    size, vocab = backend.get_vocab_size(with_added_tokens=True), config["vocab_size"]
    if size > vocab:
        raise CheckpointError(f"{directory / TOKENIZER}: has {size} tokens, more than the model's vocab_size "
                              f"{vocab} ({CONFIG}); the tokenizer does not belong to this model: save the one "
                              "it was trained with into the directory")
    return True
