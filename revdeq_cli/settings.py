"""Settings of a training run: six pydantic sections, merged from five layers, validated before any work.

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
       port's flat keys (below), in any mix
    3. environment: `REVDEQ_<SECTION>__<KEY>=value`, e.g. `REVDEQ_TRAIN__LR=3e-4` (values parse as YAML)
    4. command line: `--set section.key=value` (repeatable), then the dedicated flags (`--lr`, ...)

The run ends at whichever of train.max_steps, train.epochs, train.max_tokens comes first; when no layer
sets any of them, train.max_steps = DEFAULT_MAX_STEPS (1200: the no-flags run takes under 5 minutes on a
2-core CPU and reaches validation perplexity ~5 on pydoc; docs/equilibrium-study.md).

Defaults that follow another setting (a value the user gives is kept and validated as given):

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
where the value came from, e.g. ``train.lr: must be > 0 (got -1.0, from REVDEQ_TRAIN__LR)``.

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

Importing this module is cheap (pydantic and yaml only); filling in a preset imports `revdeq_cli.model`.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from revdeq_cli.errors import ConfigError
from revdeq_cli.solver_facts import ADJOINTS, EXPLICIT, SOLVER_FACTS, SOLVERS

ENV_PREFIX = "REVDEQ_"
DEFAULT_MAX_STEPS = 1200  # the no-flags run: minutes on a 2-core CPU (docs/performance.md)
DEFAULT_SEQ_LEN = 128  # data.seq_len when neither it nor a context is known (resolve_settings sets the model's)
WARMUP_FRACTION = 0.1  # an unset train.warmup_steps: this fraction of the run's optimiser steps ...
WARMUP_MAX_STEPS = 1000  # ... but at most this many


class SettingsWarning(UserWarning):
    """A setting was accepted but has no effect (e.g. the earlier port's `report_to`)."""

SOLVER_NAMES = (*SOLVERS, EXPLICIT)
ADJOINT_NAMES = ADJOINTS
# The gradient method an unset solver.adjoint takes for each solver (None: the explicit model solves nothing).
ADJOINT_FOR_SOLVER: dict[str, str | None] = {
    **{name: facts.default_adjoint for name, facts in SOLVER_FACTS.items()}, EXPLICIT: None,
}


def auto_warmup_steps(total_steps: int) -> int:
    """The warmup of a run whose `train.warmup_steps` is unset: WARMUP_FRACTION of its `total_steps`
    optimiser steps (rounded), at most WARMUP_MAX_STEPS; never more than the run itself."""
    return max(0, min(WARMUP_MAX_STEPS, round(WARMUP_FRACTION * total_steps), total_steps))


def _auto_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() == "auto" else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """Architecture. Every field but `preset` defaults to None, meaning "the preset's value"; after
    `resolve_settings` all of them are filled in (except `vocab_size`: None = the tokenizer's size)."""

    preset: str = "tiny"
    vocab_size: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    max_position_embeddings: int | None = Field(None, gt=0)
    num_hidden_layers: int | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    tie_word_embeddings: bool | None = None
    bias: bool | None = None
    layer_norm_eps: float | None = Field(None, gt=0.0)
    init_state: Literal["zeros", "input"] | None = None  # z0 = 0 (the paper's) or z0 = x (the input injection)
    block_skip: Literal["state", "input"] | None = None  # f = z + a + m (the GPT block) or f = x + a + m

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelSettings:
        if self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.num_attention_heads: {self.num_attention_heads} heads do not divide "
                f"model.hidden_size {self.hidden_size}; pick a divisor"
            )
        return self


class SolverSettings(_Section):
    """Fixed-point solver and gradient method (see `revdeq_cli.deq`). None = the preset's value."""

    solver: Literal[SOLVER_NAMES] | None = None  # type: ignore[valid-type]
    adjoint: Literal[ADJOINT_NAMES] | None = None  # type: ignore[valid-type]
    beta: float | None = Field(None, gt=0.0, lt=2.0)
    tol: float | None = Field(None, ge=0.0)  # 0 = never stop early: always max_steps steps (config tol=None)
    max_steps: int | None = Field(None, gt=0)
    inference_max_steps: int | None = Field(None, ge=0)  # None = the training depth; 0 = z0 (bypassed)
    inference_readout: Literal["z", "midpoint"] | None = None  # eval mode reads z_N or (y_N + z_N) / 2 (reversible)
    state_dtype: Literal["float64", "float32"] | None = None
    anderson_m: int | None = Field(None, gt=0)  # the solver's options (RevDEQConfig.solver_options) ...
    phantom_steps: int | None = Field(None, gt=0)  # ... and the gradient method's (adjoint_options)
    implicit_max_steps: int | None = Field(None, gt=0)
    implicit_tol: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> SolverSettings:
        refuses_one = self.solver is None or (self.solver in SOLVER_FACTS
                                               and not SOLVER_FACTS[self.solver].beta_one_allowed)
        if self.beta is not None and self.beta == 1.0 and refuses_one:  # None: the preset's, reversible
            raise ValueError(
                "solver.beta: must not be 1 for the reversible solver (its reversal divides by 1 - beta); "
                "use e.g. 0.5 or 0.8"
            )
        if self.adjoint == "reversible" and self.solver not in (None, "reversible"):
            usual = ADJOINT_FOR_SOLVER.get(self.solver)
            fix = (f"use --adjoint {usual} (solver {self.solver}'s default), or drop --adjoint" if usual
                   else "drop --adjoint (the explicit model needs none)")
            raise ValueError(
                f"solver.adjoint: 'reversible' needs solver.solver=reversible (got {self.solver!r}); {fix}"
            )
        return self


class ObjectiveSettings(_Section):
    """The training objective (`revdeq_cli.training.objective`): stored with the run, not in the model it saves.
    The defaults are the plain cross-entropy; a recipe sets the rest (`revdeq_cli.recipes`)."""

    # graph-free solver steps before the differentiated ones, drawn per optimiser step (model/step_rule.py):
    # "0", "2", "uniform:1-4", "poisson-lognormal:[START-]6[:MAX[:SIGMA]]" (START-: a curriculum)
    detached_steps: str = "0"
    fixed_point_penalty: float = Field(0.0, ge=0.0)  # lam * ||f(z) - z||^2 / ||f(z)||^2 at the solver's output
    penalty_tail: float = Field(1.0, gt=0.0, le=1.0)  # ... averaged over the worst fraction q of positions
    penalty_ramp: float = Field(0.0, ge=0.0, lt=1.0)  # ... ramped in over this fraction of the run's steps
    next_iterate_loss: float = Field(0.0, ge=0.0)  # + mu * the cross-entropy read at f(z_N)

    @field_validator("detached_steps", mode="before")
    @classmethod
    def _step_rule(cls, value: Any) -> Any:
        from revdeq_cli.model.step_rule import StepRule

        try:
            return str(StepRule.parse(value, field="objective.detached_steps", minimum=0))
        except ConfigError as err:
            raise ValueError(str(err)) from None


class DataSettings(_Section):
    """What to train on (see `revdeq_cli.data.prepare_corpus`)."""

    dataset: str = "pydoc"
    dataset_config: str | None = None
    tokenizer: str = "byte"
    seq_len: int = Field(DEFAULT_SEQ_LEN, gt=1)  # not given: model.max_position_embeddings (resolve_settings)
    offline: bool = False
    max_vocab_size: int | None = Field(None, gt=0)
    cache_dir: str | None = None


class TrainSettings(_Section):
    """The loop. `batch_size` is the micro-batch per process; the effective batch per optimiser step is
    batch_size * grad_accum * world_size sequences. The run stops at whichever of max_steps, epochs and
    max_tokens comes first (at least one must be set)."""

    recipe: Literal["equilibrium", "paper"] = "equilibrium"  # how the model solves and trains (recipes.py)
    out_dir: str | None = None  # None = runs/<dataset>-<timestamp>
    max_steps: int | None = Field(None, gt=0)  # None with epochs/max_tokens also None: DEFAULT_MAX_STEPS
    epochs: float | None = Field(None, gt=0.0)
    max_tokens: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio
    weight_decay: float = Field(0.1, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.99, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int | None = Field(None, ge=0)  # None / "auto": auto_warmup_steps(the run's steps)
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)  # lr *= factor when val loss stalls
    plateau_patience: int = Field(2, ge=0)  # evaluations without improvement before a cut
    grad_clip: float = Field(1.0, ge=0.0)  # max global grad norm; 0 = no clipping
    # auto: bf16 autocast where the device multiplies bfloat16 natively (deq.precision: CUDA >= 8.0, CPUs with AMX
    # or AVX512-BF16), fp32 elsewhere; the run stores what auto chose (training.loop.resolve_precision)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the block(s) f (model/compile.py); unavailable/failing -> warn, eager
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    eval_every: int = Field(100, ge=0)  # 0 = only at the end
    eval_batches: int | None = Field(None, gt=0)  # cap on validation batches during training; None = all
    eval_batch_size: int | None = Field(None, gt=0)  # sequences per evaluation batch; None = batch_size
    save_every: int = Field(200, ge=0)  # 0 = only at the end (and on Ctrl-C)
    keep_last: int = Field(3, gt=0)
    resume: str | None = None  # None | "auto" | PATH
    overwrite: bool = False  # a fresh run may delete another run's files in out_dir first (run_dir.py)

    @field_validator("warmup_steps", mode="before")
    @classmethod
    def _warmup_auto(cls, value: Any) -> Any:
        return _auto_to_none(value)

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        if self.max_steps is None and self.epochs is None and self.max_tokens is None:
            raise ValueError("train.max_steps: set at least one of train.max_steps, train.epochs, "
                             "train.max_tokens so the run can end")
        dev = self.device
        if dev not in ("auto", "cpu", "mps", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ValueError(f"train.device: unknown device {dev!r}; use auto, cpu, cuda, cuda:N or mps")
        return self


class LogSettings(_Section):
    """What the run shows and records."""

    progress: Literal["auto", "rich", "plain"] = "auto"  # auto: rich on a terminal, plain lines otherwise
    log_every: int = Field(10, gt=0)  # plain-line and TensorBoard cadence, in optimiser steps
    tensorboard: bool = True


class Settings(_Section):
    """All settings of a run. `Settings().model_dump()` is the YAML written to the run's config.yaml."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    solver: SolverSettings = Field(default_factory=SolverSettings)
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _cross_section(self) -> Settings:
        mpe = self.model.max_position_embeddings
        if mpe is not None and self.data.seq_len > mpe:
            raise ValueError(f"data.seq_len: {self.data.seq_len} is longer than "
                             f"model.max_position_embeddings {mpe}; lower it or raise the other")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    def model_config_overrides(self) -> dict[str, Any]:
        """Keyword arguments for `RevDEQConfig.from_preset(self.model.preset, vocab_size=..., **kw)`:
        every model and solver field that is set (vocab_size and preset excluded)."""
        out = {k: v for k, v in self.model.model_dump().items()
               if k not in ("preset", "vocab_size") and v is not None}
        solver = {k: v for k, v in self.solver.model_dump().items() if v is not None}
        options = {"anderson_m": ("solver_options", "m"), "implicit_tol": ("adjoint_options", "tol"),
                   "implicit_max_steps": ("adjoint_options", "max_steps"),
                   "phantom_steps": ("adjoint_options", "steps")}
        for name, (field, key) in options.items():
            value = solver.pop(name, None)
            if value is not None and key in _OPTION_OWNERS[field].get(solver.get("solver" if field ==
                                                                                   "solver_options" else "adjoint"),
                                                                      ()):
                out.setdefault(field, {})[key] = value
        out.update(solver)
        if out.get("tol") == 0:
            out["tol"] = None  # the model's spelling of "never stop early"
        return out


# Which solver / gradient method takes which option (RevDEQConfig.SOLVER_OPTIONS / ADJOINT_OPTIONS): the settings'
# anderson_m, implicit_* and phantom_steps apply to theirs only.
_OPTION_OWNERS: dict[str, dict[str, tuple[str, ...]]] = {
    "solver_options": {"anderson": ("m",)},
    "adjoint_options": {"implicit": ("tol", "max_steps"), "phantom": ("steps",)},
}
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

SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSettings, "solver": SolverSettings, "objective": ObjectiveSettings, "data": DataSettings,
    "train": TrainSettings, "log": LogSettings,
}

# Earlier port's flat keys -> dotted keys (a callable maps the value itself; see the module docstring).
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
    raise ConfigError(_unknown_key_message(key, source))


def _unknown_key_message(key: str, source: str) -> str:
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
            raise ConfigError(_unknown_key_message(dotted, source))
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


def env_layer(environ: Mapping[str, str] | None = None) -> list[tuple[str, Any, str]]:
    """`REVDEQ_SECTION__KEY=value` variables as (dotted key, parsed value, variable name). Variables
    without `__` (REVDEQ_CACHE_DIR, ...) belong to other parts of revdeq and are skipped."""
    environ = os.environ if environ is None else environ
    out = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX):]:
            continue
        section, _, field = name[len(ENV_PREFIX):].lower().partition("__")
        out.append((f"{section}.{field}", parse_value(raw), name))
    return out


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
    """Merge `base` < `config_file` < environment < `--set` items < `flags`, unvalidated.

    Returns ({dotted key: value}, {dotted key: where the value came from}). Keys are checked (unknown ones
    raise `ConfigError`), values are not: `resolve_settings` validates. `flags` maps dotted keys to values
    of the dedicated CLI options that were given (None values are skipped); `flag_names` maps the same keys
    to the option spelling used in messages (`--lr`). `base` is a nested settings mapping beneath the
    user's layers: a resumed run's stored settings, so `--resume` continues the run as configured.
    """
    layers: list[tuple[str, Any, str]] = []  # (dotted key, value, source), lowest precedence first
    if base is not None:
        layers += [(k, v, base_source) for k, v in flatten(base, base_source)]
    if config_file is not None:
        src = f"--config {config_file}"
        layers += [(k, v, src) for k, v in flatten(load_yaml_layer(config_file), src)]
    for key, value, var in env_layer(environ):
        layers += [(k, v, var) for k, v in flatten({key: value}, var)]
    for item in sets:
        key, value = parse_set_option(item)
        layers += [(k, v, f"--set {item}") for k, v in flatten({key: value}, f"--set {item}")]
    for key, value in (flags or {}).items():
        if value is not None:
            src = (flag_names or {}).get(key, key)
            layers += [(k, v, src) for k, v in flatten({key: value}, src)]

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value, src in layers:
        merged[key] = value
        sources[key] = src
    return merged, sources


def resolve_settings(*, fill_preset: bool = True, **layers: Any) -> Settings:
    """Merge the preset beneath the layers of `merge_layers` (same keyword arguments) and validate.

    With `fill_preset`, every model/solver field still unset takes the preset's value (this imports the
    model package). Defaults that follow another setting are derived here (see the module docstring).
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
        raise ConfigError(_describe(err, dotted, sources or {})) from None


def settings_from_dict(data: Mapping[str, Any], source: str) -> Settings:
    """Validate a nested settings mapping (e.g. a run's config.yaml or a checkpoint's stored settings)."""
    return validate(dict(flatten(data, source)), {})


def _describe(err: ValidationError, dotted: Mapping[str, Any], sources: Mapping[str, str]) -> str:
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
        return _unknown_key_message(key, sources.get(key, "settings"))
    value = dotted.get(key, first.get("input"))
    src = sources.get(key)
    detail = f"got {value!r}" + (f", from {src}" if src else "")
    return f"{key}: {msg[0].lower() + msg[1:]} ({detail})"
