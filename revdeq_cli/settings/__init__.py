"""Settings of a training run: six pydantic sections, merged from five layers, validated before any work.

    schema.py   the sections (`Settings`), each field's meaning (`Field(description=...)`) and the defaults
                that follow another setting (`FOLLOWS`); `revdeq train`'s options take their help from here
    layers.py   the layers as pydantic-settings sources and their merge (`merge_layers`); the earlier port's
                flat keys, renamed and removed keys
    resolve.py  `resolve_settings`: the preset and recipe beneath the merge, derived defaults, validation

Sections (each a pydantic model; unknown keys are errors):

    model      preset, architecture fields (None = the preset's value)
    solver     solver / adjoint names, beta, tol, max_steps, state_dtype, inference settings, ...
    objective  the training objective: graph-free start, fixed-point penalty, next-iterate loss (training/objective.py)
    data       dataset, tokenizer, seq_len, offline
    train      recipe, steps/epochs/tokens, batch, optimiser, schedule, precision, device, eval/save cadence, resume
    log        progress display, log cadence, TensorBoard

Layers, lowest precedence first (`resolve_settings`):

    0. the preset (`model.preset`, default "tiny"): its size, and the model config's defaults for every model and
       solver field nothing above sets
    1. the recipe (`train.recipe`, default "equilibrium"; `revdeq_cli.recipes`): how the model solves and trains
    2. a YAML file (`--config`): sectioned (`train: {lr: 3e-4}`), dotted (`train.lr: 3e-4`) or the earlier
       port's flat keys (`layers.py`), in any mix
    3. environment: `REVDEQ_<SECTION>__<KEY>=value`, e.g. `REVDEQ_TRAIN__LR=3e-4` (values parse as YAML);
       variables without `__` (REVDEQ_CACHE_DIR, REVDEQ_STDLIB_DIR) are not settings
    4. command line: `--set section.key=value` (repeatable), then the dedicated flags (`--lr`, ...)

Layers 2-4 (and a resumed run's stored settings beneath them) are pydantic-settings sources, merged by
pydantic-settings (`layers._Layers`, a `BaseSettings` of six raw sections). What stays written by hand, and
why: the translation of each layer's keys (aliases, renamed and removed keys, did-you-mean), which no source
of pydantic-settings does; a map of which layer set each key, for the messages; the preset and recipe fill and
the derived defaults below, which depend on the merged values (so they follow the merge, `resolve.py`); and the
translation of `ValidationError`s into one line naming key, reason and layer. `Settings` itself stays a plain
pydantic model, not a `BaseSettings`: a checkpoint's stored settings must validate without the environment.

The run ends at whichever of train.max_steps, train.epochs, train.max_tokens comes first; when no layer
sets any of them, train.max_steps = DEFAULT_MAX_STEPS (1200: the no-flags run takes under 5 minutes on a
2-core CPU and reaches validation perplexity ~5 on pydoc; docs/equilibrium-study.md).

Defaults that follow another setting (a value the user gives is kept and validated as given; `FOLLOWS`):

    solver.adjoint       follows solver.solver (ADJOINT_FOR_SOLVER): reversible -> reversible, picard/relaxed
                         -> unrolled, anderson/broyden -> implicit, explicit -> none (null; no solve to
                         differentiate). With no solver given either, the preset's pair.
    train.warmup_steps   null/"auto" = WARMUP_FRACTION of the run's optimiser steps, at most WARMUP_MAX_STEPS
                         (`auto_warmup_steps`). Resolved here when train.max_steps alone ends the run, else by
                         the trainer once it knows the run's steps (from epochs / max_tokens and the data); the
                         run's config.yaml, header and checkpoints hold the resolved number.
    data.seq_len         the model's context: model.max_position_embeddings (the preset's, or the one given).
    model.max_position_embeddings
                         a data.seq_len given shorter than the preset's context makes the context seq_len, so
                         the saved model declares only positions it trained on. A context given explicitly is
                         kept (the run header then warns that positions seq_len..context-1 get no training);
                         a data.seq_len longer than the context is an error.

A resumed run's stored settings (the `base` layer) count as set: a resumed run keeps the values it started
with (its warmup, its adjoint), so `--resume ... --solver anderson` of a reversible run must also name an
adjoint. Only a warmup given now is checked against train.max_steps: a resumed run may stop before the
warmup it started with has ended.

A value that fails validation raises `revdeq_cli.errors.ConfigError` naming the dotted field, the reason and
where the value came from, e.g. ``train.lr: must be > 0 (got -1.0, from REVDEQ_TRAIN__LR)``. Validation
happens once, when the run is set up.

Importing this package is cheap (pydantic and yaml: the schema, which every command's help may need); the layers
and their resolution, with pydantic-settings, load on first use of one of their names; filling in a preset
imports `revdeq_cli.model`.
"""

from importlib import import_module
from typing import Any

from revdeq_cli.settings.schema import (
    ADJOINT_FOR_SOLVER,
    ADJOINT_NAMES,
    DEFAULT_MAX_STEPS,
    DEFAULT_SEQ_LEN,
    FOLLOWS,
    SECTIONS,
    SOLVER_NAMES,
    WARMUP_FRACTION,
    WARMUP_MAX_STEPS,
    DataSettings,
    LogSettings,
    ModelSettings,
    ObjectiveSettings,
    Settings,
    SolverSettings,
    TrainSettings,
    auto_warmup_steps,
    choices,
    field_info,
    option_help,
    shown_default,
)

# Names of layers.py and resolve.py, loaded on first use (PEP 562).
_LAZY: dict[str, str] = {
    **dict.fromkeys(("ALIASES", "ENV_PREFIX", "IGNORED_KEYS", "REMOVED_KEYS", "RENAMED_KEYS", "SettingsWarning",
                     "env_layer", "flatten", "load_yaml_layer", "merge_layers", "parse_set_option", "parse_value",
                     "unknown_key_message"), "revdeq_cli.settings.layers"),
    **dict.fromkeys(("describe", "preset_values", "recipe_layer", "resolve_settings", "settings_from_dict",
                     "validate"), "revdeq_cli.settings.resolve"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ADJOINT_FOR_SOLVER", "ADJOINT_NAMES", "ALIASES", "DEFAULT_MAX_STEPS", "DEFAULT_SEQ_LEN", "ENV_PREFIX", "FOLLOWS",
    "IGNORED_KEYS", "REMOVED_KEYS", "RENAMED_KEYS", "SECTIONS", "SOLVER_NAMES", "WARMUP_FRACTION", "WARMUP_MAX_STEPS",
    "DataSettings", "LogSettings", "ModelSettings", "ObjectiveSettings", "Settings", "SettingsWarning",
    "SolverSettings", "TrainSettings", "auto_warmup_steps", "choices", "describe", "env_layer", "field_info",
    "flatten", "load_yaml_layer", "merge_layers", "option_help", "parse_set_option", "parse_value", "preset_values",
    "recipe_layer", "resolve_settings", "settings_from_dict", "shown_default", "unknown_key_message", "validate",
]
