"""The layers a run's settings come from, and their merge by pydantic-settings.

Each layer is a pydantic-settings source (`PydanticBaseSettingsSource`) that yields {section: {field: value}}:
the resumed run's stored settings and each `--set` item and flag (`InitSettingsSource`), the `--config` file
(`YamlConfigSettingsSource`) and the environment (`EnvSettingsSource`: prefix `REVDEQ_`, nested delimiter `__`,
any case; each value then parsed as YAML). `_Layers` (a `BaseSettings` of six raw sections) lists them in
`settings_customise_sources` and pydantic-settings merges them, the higher layer winning key by key. Values are
not validated here: `resolve_settings` derives the defaults that follow other settings, then validates.

Written by hand around it, as pydantic-settings has no place for them: the translation of each layer's keys
(`flatten`: sectioned, dotted and the earlier port's flat keys, renamed and removed keys, unknown keys with a
did-you-mean), the refusal of `REVDEQ_<UNKNOWN>__X` variables (pydantic-settings skips them silently), the
`--config` errors that name the file (it skips a missing file), and the map of where each key came from that the
error messages name (`merge_layers` returns it beside the values, built from the same sources).

Key aliases for the earlier PyTorch port's flat YAML (../shared/fixtures/revdeq-pytorch/default.yaml):

    hidden_size                  -> model.hidden_size
    num_heads                    -> model.num_attention_heads
    intermediate_size            -> model.intermediate_size
    max_position_embeddings      -> model.max_position_embeddings
    vocab_size                   -> model.vocab_size (must be >= the tokenizer's; the embedding is padded)
    num_layers                   -> model.num_hidden_layers
    dropout                      -> model.dropout
    num_fixed_point_iterations   -> solver.max_steps
    fixed_point_tol              -> solver.tol
    beta                         -> solver.beta
    use_reversible               -> true: solver.solver=reversible, solver.adjoint=reversible;
                                    false: solver.solver=relaxed, solver.adjoint=unrolled (the same damped
                                    iteration, differentiated by autograd through every step)
    num_epochs                   -> train.epochs
    max_steps                    -> train.max_steps
    batch_size                   -> train.batch_size (micro-batch per process)
    gradient_accumulation_steps  -> train.grad_accum
    learning_rate                -> train.lr
    weight_decay                 -> train.weight_decay
    warmup_steps                 -> train.warmup_steps
    max_grad_norm                -> train.grad_clip
    seed                         -> train.seed
    output_dir                   -> train.out_dir
    fp16 / bf16                  -> train.precision = fp16 / bf16 (both true is an error)
    eval_steps                   -> train.eval_every
    save_steps                   -> train.save_every
    save_total_limit             -> train.keep_last
    logging_steps                -> log.log_every
    tokenizer                    -> data.tokenizer
    dataloader_num_workers, report_to, logging_dir
                                 -> accepted with a warning and ignored (the token data is an in-memory
                                    array, so there are no loader workers; TensorBoard is always written
                                    unless log.tensorboard=false)
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from revdeq_cli.errors import ConfigError
from revdeq_cli.settings.schema import SECTIONS

ENV_PREFIX = "REVDEQ_"
ENV_DELIMITER = "__"


class SettingsWarning(UserWarning):
    """A setting was accepted but has no effect (e.g. the earlier port's `report_to`)."""


# Keys of settings written before the training objective had its own section (revdeq 0.1; a resumed run's
# stored settings, an old config.yaml): renamed ones map to their new key, removed ones (their option lost its
# study, docs/equilibrium-study.md) are dropped at the value that meant "off" and refused otherwise.
RENAMED_KEYS: dict[str, str] = {
    "solver.train_detached_steps": "objective.detached_steps",
    "solver.fixed_point_penalty": "objective.fixed_point_penalty",
    "solver.fixed_point_penalty_tail": "objective.penalty_tail",
    "solver.penalty_ramp": "objective.penalty_ramp",
    "solver.next_iterate_loss": "objective.next_iterate_loss",
}
REMOVED_KEYS: dict[str, Any] = {
    "solver.train_steps": None, "solver.train_detached_precision": "same", "solver.jacobian_penalty": 0.0,
    "solver.train_init_noise": 0.0, "solver.train_state_noise": 0.0, "model.output_init_scale": 1.0,
    "model.block_output_norm": False,
}

# Earlier port's flat keys -> dotted keys (see the module docstring for the ones mapped by hand).
ALIASES: dict[str, str] = {
    "hidden_size": "model.hidden_size",
    "num_heads": "model.num_attention_heads",
    "intermediate_size": "model.intermediate_size",
    "max_position_embeddings": "model.max_position_embeddings",
    "vocab_size": "model.vocab_size",
    "num_layers": "model.num_hidden_layers",
    "dropout": "model.dropout",
    "num_fixed_point_iterations": "solver.max_steps",
    "fixed_point_tol": "solver.tol",
    "beta": "solver.beta",
    "num_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr",
    "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps",
    "max_grad_norm": "train.grad_clip",
    "seed": "train.seed",
    "output_dir": "train.out_dir",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "logging_steps": "log.log_every",
    "tokenizer": "data.tokenizer",
}
IGNORED_KEYS = ("dataloader_num_workers", "report_to", "logging_dir")


# --------------------------------------------------------------------------- keys of one layer
def _alias_entries(key: str, value: Any, source: str) -> list[tuple[str, Any]]:
    """Translate one flat key of the earlier port into (dotted key, value) pairs."""
    if key in ALIASES:
        return [(ALIASES[key], value)]
    if key == "use_reversible":
        if not isinstance(value, bool):
            raise ConfigError(f"use_reversible: must be true or false (got {value!r}, from {source})")
        return [("solver.solver", "reversible" if value else "relaxed"),
                ("solver.adjoint", "reversible" if value else "unrolled")]
    if key in ("fp16", "bf16"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false (got {value!r}, from {source})")
        return [(f"__flag__.{key}", value)]
    if key in IGNORED_KEYS:
        warnings.warn(f"{key} (from {source}) has no meaning in revdeq and is ignored", SettingsWarning, stacklevel=2)
        return []
    raise ConfigError(unknown_key_message(key, source))


def unknown_key_message(key: str, source: str) -> str:
    """`key: unknown setting (from SOURCE); did you mean ...?`"""
    section, _, field = key.partition(".")
    if field and section in SECTIONS:
        known = list(SECTIONS[section].model_fields)
        close = difflib.get_close_matches(field, known, n=1, cutoff=0.5)
        hint = f"did you mean {section}.{close[0]}?" if close else f"known keys: {', '.join(known)}"
        return f"{key}: unknown setting (from {source}); {hint}"
    candidates = list(SECTIONS) + list(ALIASES) + [f"{s}.{f}" for s, m in SECTIONS.items() for f in m.model_fields]
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f"did you mean {close[0]}?" if close else f"sections are {', '.join(SECTIONS)}"
    return f"{key}: unknown setting (from {source}); {hint}"


def flatten(mapping: Mapping[str, Any], source: str) -> list[tuple[str, Any]]:
    """Turn one layer (sectioned, dotted or flat-alias keys) into a list of (dotted key, value)."""
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: must be a mapping of settings (got {value!r}, from {source})")
            out.extend((f"{key}.{k}", v) for k, v in value.items())
        elif "." in key:
            out.append((key, value))
        else:
            out.extend(_alias_entries(key, value, source))
    out = _renamed(out, source)
    for dotted, _ in out:
        section, _, field = dotted.partition(".")
        if section == "__flag__":
            continue
        if section not in SECTIONS or field not in SECTIONS[section].model_fields:
            raise ConfigError(unknown_key_message(dotted, source))
    return _resolve_precision_flags(out, source)


def _renamed(entries: list[tuple[str, Any]], source: str) -> list[tuple[str, Any]]:
    """`entries` with the keys of older settings mapped (`RENAMED_KEYS`, `REMOVED_KEYS`)."""
    out = []
    for key, value in entries:
        if key in REMOVED_KEYS:
            if value is None or value == REMOVED_KEYS[key]:
                continue
            raise ConfigError(f"{key}: removed in revdeq 0.2, its option lost its study (docs/equilibrium-study.md); "
                              f"drop it (got {value!r}, from {source})")
        out.append((RENAMED_KEYS.get(key, key), value))
    return out


def _resolve_precision_flags(entries: list[tuple[str, Any]], source: str) -> list[tuple[str, Any]]:
    flags = {k.split(".", 1)[1]: v for k, v in entries if k.startswith("__flag__.")}
    rest = [(k, v) for k, v in entries if not k.startswith("__flag__.")]
    if flags.get("fp16") and flags.get("bf16"):
        raise ConfigError(f"fp16/bf16: both are true (from {source}); keep one")
    if flags.get("fp16"):
        rest.append(("train.precision", "fp16"))
    elif flags.get("bf16"):
        rest.append(("train.precision", "bf16"))
    elif flags:  # explicitly false
        rest.append(("train.precision", "fp32"))
    return rest


def parse_value(raw: str) -> Any:
    """Parse a `--set`/environment value as YAML (so `3e-4`, `true`, `null`, `[1, 2]` work)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def parse_set_option(item: str) -> tuple[str, Any]:
    """`section.key=value` (from `--set`) -> (key, parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.weight_decay=0.05")
    return key.strip(), parse_value(raw)


def load_yaml_layer(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a `--config` YAML file into a mapping (errors name the file)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config {p}: cannot read ({err.strerror or err}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {p}:{where} is not valid YAML; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: must be a mapping of settings, got {type(data).__name__}")
    return data


def _nest(entries: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in entries:
        section, _, field = key.partition(".")
        nested.setdefault(section, {})[field] = value
    return nested


# --------------------------------------------------------------------------- the sources pydantic-settings merges
class _Labelled:
    """A source's values and, for each dotted key it sets, the layer named in messages."""

    labels: dict[str, str]

    def _take(self, entries: list[tuple[str, Any]], label: str) -> dict[str, dict[str, Any]]:
        self.labels.update({key: label for key, _ in entries})
        return _nest(entries)


class _MappingLayer(_Labelled, InitSettingsSource):
    """A layer given as a mapping (a resumed run's stored settings, one `--set` item, the flags)."""

    def __init__(self, settings_cls: type[BaseSettings], items: list[tuple[Mapping[str, Any], str]]):
        self.labels = {}
        nested: dict[str, dict[str, Any]] = {}
        for mapping, label in items:
            for section, values in self._take(flatten(mapping, label), label).items():
                nested.setdefault(section, {}).update(values)
        super().__init__(settings_cls, nested)


class _YamlLayer(_Labelled, YamlConfigSettingsSource):
    """The `--config` file (sectioned, dotted or flat keys); unreadable or invalid, an error naming it."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | os.PathLike[str]):
        self.labels, self.label = {}, f"--config {path}"
        if not Path(path).expanduser().is_file():
            load_yaml_layer(path)  # raises the error that says why it cannot be read
        super().__init__(settings_cls, yaml_file=Path(path))

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return self._take(flatten(load_yaml_layer(file_path), self.label), self.label)


class _EnvLayer(_Labelled, EnvSettingsSource):
    """`REVDEQ_<SECTION>__<KEY>` variables, read by pydantic-settings; each value is then parsed as YAML and its
    key checked (a variable's name is the layer its messages name). Variables without `__` (REVDEQ_CACHE_DIR,
    ...) belong to other parts of revdeq and are skipped."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None):
        self.labels, self._names = {}, {}
        self._environ = os.environ if environ is None else environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        prefix = self.env_prefix.lower()
        found = {}
        for name, raw in sorted(self._environ.items()):
            lower = name.lower()
            if not lower.startswith(prefix) or ENV_DELIMITER not in lower[len(prefix):]:
                continue
            section, _, field = lower[len(prefix):].partition(ENV_DELIMITER)
            if section not in SECTIONS or ENV_DELIMITER in field:  # pydantic-settings would skip or nest it
                raise ConfigError(unknown_key_message(f"{section}.{field}", name))
            self._names[(section, field)] = name
            found[lower] = raw
        return found

    def __call__(self) -> dict[str, Any]:
        entries = []
        for section, values in super().__call__().items():
            for field, raw in values.items():
                name = self._names[(section, field)]
                value = parse_value(raw) if isinstance(raw, str) else raw
                entries += [(key, value, name) for key, value in flatten({f"{section}.{field}": value}, name)]
        for key, _, name in entries:
            self.labels[key] = name
        return _nest([(key, value) for key, value, _ in entries])


class _Plan:
    """One merge's layers: how to build each source (lowest precedence first), and the sources built."""

    def __init__(self, makers: list[Callable[[type[BaseSettings]], Any]]):
        self.makers, self.built = makers, []


_PLAN: ContextVar[_Plan] = ContextVar("_PLAN")  # the merge under way (`merge_layers`)


class _Layers(BaseSettings):
    """The merged layers, one raw mapping per section (validation comes later, `resolve_settings`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER,
                                      case_sensitive=False, extra="forbid")

    model: dict[str, Any] = Field(default_factory=dict)
    solver: dict[str, Any] = Field(default_factory=dict)
    objective: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    log: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """This run's layers (`merge_layers`), highest precedence first, as pydantic-settings wants them."""
        plan = _PLAN.get()
        plan.built = [make(settings_cls) for make in plan.makers]  # lowest first: errors in reading order
        return tuple(reversed(plan.built))


def env_layer(environ: Mapping[str, str] | None = None) -> list[tuple[str, Any, str]]:
    """The environment's settings as (dotted key, parsed value, variable name), read as `merge_layers` reads them."""
    merged, sources = merge_layers(environ=environ)
    return [(key, value, sources[key]) for key, value in merged.items()]


def merge_layers(
    *,
    config_file: str | os.PathLike[str] | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    base_source: str = "the resumed checkpoint",
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge `base` < `config_file` < environment < `--set` items < `flags`, unvalidated (pydantic-settings).

    Returns ({dotted key: value}, {dotted key: where the value came from}). Keys are checked (unknown ones
    raise `ConfigError`), values are not: `resolve_settings` validates. `flags` maps dotted keys to values
    of the dedicated CLI options that were given (None values are skipped); `flag_names` maps the same keys
    to the option spelling used in messages (`--lr`). `base` is a nested settings mapping beneath the
    user's layers: a resumed run's stored settings, so `--resume` continues the run as configured.
    `environ` stands in for `os.environ`.
    """
    makers: list[Callable[[type[BaseSettings]], Any]] = []  # lowest precedence first
    if base is not None:
        makers.append(lambda cls: _MappingLayer(cls, [(base, base_source)]))
    if config_file is not None:
        makers.append(lambda cls: _YamlLayer(cls, config_file))
    makers.append(lambda cls: _EnvLayer(cls, environ))
    for item in sets:
        makers.append(lambda cls, item=item: _MappingLayer(cls, [(dict([parse_set_option(item)]), f"--set {item}")]))
    given = [({key: value}, (flag_names or {}).get(key, key)) for key, value in (flags or {}).items()
             if value is not None]
    makers.append(lambda cls: _MappingLayer(cls, given))

    plan = _Plan(makers)
    token = _PLAN.set(plan)
    try:
        layers = _Layers()
    finally:
        _PLAN.reset(token)
    sources: dict[str, str] = {}
    for source in plan.built:  # lowest first, as pydantic-settings ranks them: a higher layer's label wins
        sources.update(source.labels)
    merged = {f"{section}.{field}": value for section, values in layers.model_dump().items()
              for field, value in values.items()}
    return merged, {key: sources[key] for key in merged}
