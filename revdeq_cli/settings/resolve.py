"""From the merged layers to validated `Settings`: the preset and recipe beneath them, the defaults that follow
another setting, and validation errors that name the dotted key, the reason and the layer the value came from.

The preset and the recipe fill only what no layer set, and what they set depends on the merged layers
(`model.preset`, `train.recipe`, whether a solver or a context was given), so they are filled here, after the
pydantic-settings merge (`merge_layers`), rather than as sources of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from revdeq_cli.errors import ConfigError
from revdeq_cli.settings.layers import flatten, merge_layers, unknown_key_message
from revdeq_cli.settings.schema import (
    ADJOINT_FOR_SOLVER,
    DEFAULT_MAX_STEPS,
    SECTIONS,
    WARMUP_FRACTION,
    ModelSettings,
    Settings,
    _auto_to_none,
    auto_warmup_steps,
)


def preset_values(name: str) -> dict[str, Any]:
    """The model and solver fields a preset's size and the config's defaults set, as dotted keys (imports
    `revdeq_cli.model`)."""
    from revdeq_cli.model.config import RevDEQConfig
    from revdeq_cli.model.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = RevDEQConfig.from_preset(name, vocab_size=256).to_dict()  # preset + the config's own defaults
    if cfg.get("tol") is None:
        cfg["tol"] = 0.0
    out = {}
    for section in ("model", "solver"):
        for field in SECTIONS[section].model_fields:
            if field not in ("preset", "vocab_size") and field in cfg:
                out[f"{section}.{field}"] = cfg[field]
    return out


def resolve_settings(*, fill_preset: bool = True, **layers: Any) -> Settings:
    """Merge the preset beneath the layers of `merge_layers` (same keyword arguments) and validate.

    With `fill_preset`, every model/solver field still unset takes the preset's value (this imports the
    model package). Defaults that follow another setting are derived here (see the package docstring).
    Raises `ConfigError` naming the field, its source and the fix.
    """
    merged, sources = merge_layers(**layers)
    base_source = layers.get("base_source", "the resumed checkpoint") if layers.get("base") is not None else None
    if not any(merged.get(f"train.{k}") is not None for k in ("max_steps", "epochs", "max_tokens")):
        merged["train.max_steps"] = DEFAULT_MAX_STEPS
    _adjoint_follows_solver(merged, sources)
    _check_resumed_adjoint(merged, sources, base_source)
    if fill_preset:
        preset = merged.get("model.preset", ModelSettings.model_fields["preset"].default)
        if not isinstance(preset, str):
            raise ConfigError(f"model.preset: must be a name (got {preset!r}, from {sources['model.preset']})")
        _fill(merged, sources, recipe_layer(merged, sources, preset))
        _fill(merged, sources, {k: (v, f"preset {preset}") for k, v in preset_values(preset).items()})
    _seq_len_and_context(merged, sources, preset_context=sources.get("model.max_position_embeddings", "")
                         .startswith("preset "))
    _warmup_follows_max_steps(merged, sources)
    settings = validate(merged, sources)
    _check_given_warmup(settings, sources, base_source)
    return settings


def _check_resumed_adjoint(merged: dict[str, Any], sources: dict[str, str], base_source: str | None) -> None:
    """A resumed run's stored adjoint is kept whatever flags are given, so when a new solver does not fit it,
    the only fix is to name an adjoint too (the generic message would also offer dropping --adjoint)."""
    solver, adjoint = merged.get("solver.solver"), merged.get("solver.adjoint")
    stored = base_source is not None and sources.get("solver.adjoint") == base_source
    if not stored or sources.get("solver.solver") == base_source:
        return
    if adjoint == "reversible" and isinstance(solver, str) and solver != "reversible":
        usual = ADJOINT_FOR_SOLVER.get(solver)
        fix = (f"give --adjoint {usual} (solver {solver}'s default) as well" if usual
               else "give --set solver.adjoint=null as well (the explicit model needs none)")
        raise ConfigError(f"solver.adjoint: the resumed run's adjoint 'reversible' (from {base_source}) needs "
                          f"solver.solver=reversible, but {sources.get('solver.solver')} sets {solver!r}; {fix}")


def _adjoint_follows_solver(merged: dict[str, Any], sources: dict[str, str]) -> None:
    """An unset solver.adjoint takes ADJOINT_FOR_SOLVER[solver] when a layer names the solver (with neither
    given, the preset supplies the pair)."""
    solver = merged.get("solver.solver")
    if merged.get("solver.adjoint") is not None:
        return
    if isinstance(solver, str) and solver in ADJOINT_FOR_SOLVER:
        merged["solver.adjoint"] = ADJOINT_FOR_SOLVER[solver]
        sources["solver.adjoint"] = f"the default for solver.solver={solver}"
    elif solver is None:
        merged.pop("solver.adjoint", None)  # `null` = not given: the preset's adjoint, with its solver


def _seq_len_and_context(merged: dict[str, Any], sources: dict[str, str], *, preset_context: bool) -> None:
    """A saved model declares the context it trained on. An unset data.seq_len is the model's context
    (model.max_position_embeddings). A data.seq_len given shorter than a context the preset supplied (not one
    a layer gave: `preset_context`) becomes the context. A longer one is left for validation to refuse."""
    seq_len, context = merged.get("data.seq_len"), merged.get("model.max_position_embeddings")
    if not (isinstance(context, int) and not isinstance(context, bool)):
        context = None
    if seq_len is None:
        if context is not None and context > 1:
            merged["data.seq_len"] = context
            sources["data.seq_len"] = "the model's context (model.max_position_embeddings)"
        else:
            merged.pop("data.seq_len", None)  # `null` = not given
        return
    given = isinstance(seq_len, int) and not isinstance(seq_len, bool)
    if preset_context and given and context is not None and 1 < seq_len < context:
        merged["model.max_position_embeddings"] = seq_len
        sources["model.max_position_embeddings"] = (f"data.seq_len (from {sources.get('data.seq_len')}; "
                                                    f"the preset's context {context} shortened to it)")


def recipe_layer(merged: Mapping[str, Any], sources: Mapping[str, str], preset: str) -> dict[str, tuple[Any, str]]:
    """The settings `train.recipe` (default `recipes.DEFAULT_RECIPE`) sets for `preset`: {key: (value, source)}."""
    from revdeq_cli.recipes import DEFAULT_RECIPE, RECIPES, recipe_values

    name = merged.get("train.recipe", DEFAULT_RECIPE)
    if name not in RECIPES:
        raise ConfigError(f"train.recipe: unknown recipe {name!r} (from {sources.get('train.recipe')}); choose one "
                          f"of {', '.join(RECIPES)}")
    return {key: (value, f"recipe {name}") for key, value in recipe_values(name, preset).items()}


def _fill(merged: dict[str, Any], sources: dict[str, str], layer: Mapping[str, tuple[Any, str]]) -> None:
    """Set the keys of `layer` that no higher layer set."""
    for key, (value, source) in layer.items():
        if key not in merged:
            merged[key] = value
            sources[key] = source


def _warmup_follows_max_steps(merged: dict[str, Any], sources: dict[str, str]) -> None:
    """An unset (null / "auto") train.warmup_steps is resolved now when train.max_steps alone ends the run;
    with epochs or max_tokens the run's length depends on the data, so the trainer resolves it."""
    if _auto_to_none(merged.get("train.warmup_steps")) is not None:
        return
    steps = merged.get("train.max_steps")
    alone = merged.get("train.epochs") is None and merged.get("train.max_tokens") is None
    if alone and isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        merged["train.warmup_steps"] = auto_warmup_steps(steps)
        sources["train.warmup_steps"] = f"auto: {WARMUP_FRACTION:g} of train.max_steps"


def _check_given_warmup(settings: Settings, sources: Mapping[str, str], base_source: str | None) -> None:
    """A warmup given now must fit in train.max_steps; one the resumed run started with is kept as it is."""
    tr = settings.train
    src = sources.get("train.warmup_steps")
    if src is None or src == base_source or src.startswith("auto"):
        return
    if tr.warmup_steps and tr.max_steps is not None and tr.warmup_steps > tr.max_steps:
        raise ConfigError(f"train.warmup_steps: {tr.warmup_steps} is more than train.max_steps {tr.max_steps}; "
                          f"lower it, or leave it unset to follow the run's length (from {src})")


def validate(dotted: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from {dotted key: value}; the first problem becomes a one-line `ConfigError`."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in dotted.items():
        section, _, field = key.partition(".")
        nested.setdefault(section, {})[field] = value
    try:
        return Settings.model_validate(nested)
    except ValidationError as err:
        raise ConfigError(describe(err, dotted, sources or {})) from None


def settings_from_dict(data: Mapping[str, Any], source: str) -> Settings:
    """Validate a nested settings mapping (e.g. a run's config.yaml or a checkpoint's stored settings)."""
    return validate(dict(flatten(data, source)), {})


def describe(err: ValidationError, dotted: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """The first problem of `err` as one line: `key: reason (got VALUE, from LAYER)`."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ":" in msg.split(" ", 1)[0]:  # the validator already named its field
            field = msg.split(":", 1)[0]
            src = sources.get(field)
            return msg + (f" (from {src})" if src else "")
    key = ".".join(loc[:2]) if loc else "settings"
    if first["type"] == "extra_forbidden":
        return unknown_key_message(key, sources.get(key, "settings"))
    value = dotted.get(key, first.get("input"))
    src = sources.get(key)
    detail = f"got {value!r}" + (f", from {src}" if src else "")
    return f"{key}: {msg[0].lower() + msg[1:]} ({detail})"
