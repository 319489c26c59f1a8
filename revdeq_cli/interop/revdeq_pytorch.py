"""Read a `model.pt` of the earlier PyTorch port ("RevDEQ-PyTorch") without executing its pickle.

That port saved `torch.save({"model_state_dict": ..., "config": cfg})` where `cfg` is a dataclass of class
`revdeq.model.RevDEQConfig`, a module that does not exist here. `torch.load(weights_only=True)` refuses
the file because of that one class; `weights_only=False` would let a file from the internet run code.
We use torch's restricted unpickler (`weights_only=True`: only tensor rebuild functions, plain
containers and explicitly allowed classes) and allow exactly one more name, `revdeq.model.RevDEQConfig`,
mapped to `_LegacyConfigRecord`, an inert class with no methods: unpickling it only stores the
dataclass's field dict. Nothing from the file is imported or called; any other global in the pickle
(`os.system`, `builtins.eval`, a foreign class) is refused before loading starts.

Architecture of that port (identical maths to ours): token + learned position embeddings; one block
`z = z + Attn(LN1(z + x)); z = z + FFN(LN2(z))` with `nn.MultiheadAttention` (packed `in_proj_weight`
[3H, H] = q, k, v stacked in that order; `out_proj`), FFN Linear(H, I) -> GELU -> Linear(I, H), no
biases in attention or FFN; final LayerNorm `ln_f`; untied `lm_head` without bias.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revdeq_cli.errors import CheckpointError

LEGACY_CONFIG_CLASS = "revdeq.model.RevDEQConfig"

# The port's config fields and their types; anything else in the file is refused.
LEGACY_CONFIG_FIELDS: dict[str, type | tuple[type, ...]] = {
    "hidden_size": int,
    "num_heads": int,
    "intermediate_size": int,
    "max_position_embeddings": int,
    "vocab_size": int,
    "layer_norm_eps": (float, int),
    "use_bias": bool,
    "num_fixed_point_iterations": int,
    "fixed_point_tol": (float, int),
    "use_reversible": bool,
    "beta": (float, int),
    # Training-only fields of that dataclass in some versions: accepted, they do not change the weights.
    "dropout": (float, int),
    "num_layers": int,
}

# Top-level entries of the saved dict that carry no model weights; ignored (the output is a slim model).
LEGACY_IGNORED_ENTRIES = ("optimizer_state_dict", "scheduler_state_dict", "epoch", "step", "global_step",
                          "loss", "best_loss")


class _LegacyConfigRecord:
    """Inert stand-in for the port's `revdeq.model.RevDEQConfig`: the restricted unpickler creates it with
    `object.__new__` and fills `__dict__` with the pickled field values. No methods, so nothing runs."""


@dataclass(frozen=True)
class LegacyCheckpoint:
    """What a RevDEQ-PyTorch `model.pt` holds: its config fields and its float tensors (by the port's names)."""

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, Any]  # name -> torch.Tensor
    ignored: list[str] = field(default_factory=list)


def read_revdeq_pytorch(path: str | Path) -> LegacyCheckpoint:
    """Load `path` through torch's weights-only unpickler; raise `CheckpointError` (one line) on anything
    unexpected: not a torch zip file, a global other than the port's config class, missing entries,
    unknown config fields, non-tensor weights."""
    import torch

    path = Path(path)
    what = "expected a RevDEQ-PyTorch model.pt saved with torch.save"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file ({what})")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format torch file ({what})")
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is unusable
        raise CheckpointError(f"{path}: cannot read the pickle ({_first_line(err)}); {what}") from None
    refused = sorted(set(foreign) - {LEGACY_CONFIG_CLASS})
    if refused:
        raise CheckpointError(f"{path}: refusing to load: the pickle references {', '.join(refused)}, "
                              f"which a RevDEQ-PyTorch checkpoint never does (nothing was executed)")
    try:
        with torch.serialization.safe_globals([(_LegacyConfigRecord, LEGACY_CONFIG_CLASS)]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt/truncated data or a refused construct
        raise CheckpointError(f"{path}: cannot load ({_first_line(err)}); {what}") from None

    if not isinstance(obj, dict) or "model_state_dict" not in obj or "config" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model_state_dict' and 'config', found {keys}")
    unknown = sorted(str(k) for k in obj if k not in ("model_state_dict", "config", *LEGACY_IGNORED_ENTRIES))
    if unknown:
        raise CheckpointError(f"{path}: unknown top-level entries {unknown}; cannot map them ({what})")
    config = _config_fields(path, obj["config"])
    state_dict = obj["model_state_dict"]
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a mapping of names to tensors")
    ignored = [k for k in LEGACY_IGNORED_ENTRIES if k in obj]
    return LegacyCheckpoint(path=path, config=config, state_dict=dict(state_dict), ignored=ignored)


def _config_fields(path: Path, cfg: object) -> dict[str, Any]:
    if isinstance(cfg, _LegacyConfigRecord):
        fields = dict(vars(cfg))
    elif isinstance(cfg, dict):  # some scripts saved `asdict(cfg)`
        fields = dict(cfg)
    else:
        raise CheckpointError(f"{path}: 'config' is a {type(cfg).__name__}, expected {LEGACY_CONFIG_CLASS}")
    for name, value in fields.items():
        kind = LEGACY_CONFIG_FIELDS.get(name)
        if kind is None:
            raise CheckpointError(f"{path}: unknown config field {name!r}; cannot map it to a RevDEQConfig")
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise CheckpointError(f"{path}: config field {name!r} = {value!r} has the wrong type")
    missing = [n for n in ("hidden_size", "num_heads", "intermediate_size", "max_position_embeddings",
                           "vocab_size") if n not in fields]
    if missing:
        raise CheckpointError(f"{path}: config lacks {missing}; cannot build a RevDEQConfig")
    return fields


def legacy_config_to_revdeq(fields: dict[str, Any]) -> dict[str, Any]:
    """The port's config fields -> keyword arguments of our `RevDEQConfig` (exact for every field we keep).

    Same translation as the settings' aliases for that port's YAML (`revdeq_cli.settings`):
    `use_reversible=True` is our reversible solver and adjoint; `False` is the same damped iteration
    (`relaxed`) differentiated through every step (`unrolled`). `num_layers` is ignored: the port's
    DEQ has one block whatever it says.
    """
    reversible = fields.get("use_reversible", True)
    out: dict[str, Any] = {
        "vocab_size": fields["vocab_size"],
        "hidden_size": fields["hidden_size"],
        "num_attention_heads": fields["num_heads"],
        "intermediate_size": fields["intermediate_size"],
        "max_position_embeddings": fields["max_position_embeddings"],
        "num_hidden_layers": 1,
        "bias": bool(fields.get("use_bias", False)),
        "solver": "reversible" if reversible else "relaxed",
        "adjoint": "reversible" if reversible else "unrolled",
        "tie_word_embeddings": False,
    }
    for ours, theirs in (("layer_norm_eps", "layer_norm_eps"), ("beta", "beta"),
                         ("max_steps", "num_fixed_point_iterations"), ("tol", "fixed_point_tol")):
        if theirs in fields:
            out[ours] = fields[theirs]
    if "dropout" in fields:
        out["dropout"] = float(fields["dropout"])
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
