"""The schema of a run's settings: six pydantic sections in `Settings`, each field with its one-line meaning
(`Field(description=...)`), and the defaults that follow another setting (`FOLLOWS`). `revdeq train`'s options
take their help and shown default from here (`option_help`, `shown_default`).

Importing this module is cheap (pydantic and yaml only).
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from revdeq_cli.errors import ConfigError
from revdeq_cli.solver_facts import ADJOINTS, EXPLICIT, SOLVER_FACTS, SOLVERS

DEFAULT_MAX_STEPS = 1200  # the no-flags run: minutes on a 2-core CPU (docs/performance.md)
DEFAULT_SEQ_LEN = 128  # data.seq_len when neither it nor a context is known (resolve_settings sets the model's)
WARMUP_FRACTION = 0.1  # an unset train.warmup_steps: this fraction of the run's optimiser steps ...
WARMUP_MAX_STEPS = 1000  # ... but at most this many

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


def _d(description: str, default: Any = None, **constraints: Any) -> Any:
    """A field with its meaning: `Field(default, description=..., **constraints)`."""
    return Field(default, description=description, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """Architecture. Every field but `preset` defaults to None, meaning "the preset's value"; after
    `resolve_settings` all of them are filled in (except `vocab_size`: None = the tokenizer's size)."""

    preset: str = _d("Model size: tiny, small, base or paper (revdeq_cli.model.presets); the recipe is chosen "
                     "apart (train.recipe)", "tiny")
    vocab_size: int | None = _d("Vocabulary size; at least the tokenizer's (the embedding is padded)", gt=0)
    hidden_size: int | None = _d("Width of the state z and of the block f", gt=0)
    num_attention_heads: int | None = _d("Attention heads of the block; must divide model.hidden_size", gt=0)
    intermediate_size: int | None = _d("Width of the block's MLP", gt=0)
    max_position_embeddings: int | None = _d("The model's context: the most positions it declares", gt=0)
    num_hidden_layers: int | None = _d("Transformer layers in the block f", gt=0)
    dropout: float | None = _d("Dropout probability in the block", ge=0.0, lt=1.0)
    tie_word_embeddings: bool | None = _d("The output head shares the input embedding's weights")
    bias: bool | None = _d("Attention and MLP projections have biases")
    layer_norm_eps: float | None = _d("LayerNorm epsilon", gt=0.0)
    init_state: Literal["zeros", "input"] | None = _d("The solver's start: zeros (z0 = 0, the paper's) or input "
                                                     "(z0 = x, the input injection)")
    block_skip: Literal["state", "input"] | None = _d("The block's skip: state (f = z + a + m, the GPT block) or "
                                                     "input (f = x + a + m)")

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

    solver: Literal[SOLVER_NAMES] | None = _d(  # type: ignore[valid-type]
        "Fixed-point solver; explicit = no solve (the non-DEQ baseline, no gradient method)")
    adjoint: Literal[ADJOINT_NAMES] | None = _d("Gradient method through the solve")  # type: ignore[valid-type]
    beta: float | None = _d("Relaxation in (0, 2); not 1 for the reversible solver", gt=0.0, lt=2.0)
    tol: float | None = _d("Stop tolerance on the relative residual; 0 = never stop early (always "
                           "solver.max_steps steps)", ge=0.0)
    max_steps: int | None = _d("Most solver steps in training", gt=0)
    inference_max_steps: int | None = _d("Most solver steps at inference; 0 = z0 (the solve bypassed)", ge=0)
    inference_readout: Literal["z", "midpoint"] | None = _d("What eval mode reads: z (z_N) or midpoint "
                                                           "((y_N + z_N) / 2, the reversible pair's)")
    state_dtype: Literal["float64", "float32"] | None = _d("Floating format of the solver's states")
    anderson_m: int | None = _d("Anderson solver: how many past iterates it mixes", gt=0)
    phantom_steps: int | None = _d("Phantom gradient: differentiated steps", gt=0)
    implicit_max_steps: int | None = _d("Implicit gradient: most steps of its linear solve", gt=0)
    implicit_tol: float | None = _d("Implicit gradient: tolerance of its linear solve", gt=0.0)

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

    detached_steps: str = _d("Graph-free solver steps before the differentiated ones, drawn per optimiser step "
                             "(model/step_rule.py): 0, 2, uniform:1-4, poisson-lognormal:[START-]6[:MAX[:SIGMA]] "
                             "(START-: a curriculum)", "0")
    fixed_point_penalty: float = _d("Weight lam of the penalty lam * ||f(z) - z||^2 / ||f(z)||^2 at the solver's "
                                    "output", 0.0, ge=0.0)
    penalty_tail: float = _d("The penalty averages the worst fraction q of positions", 1.0, gt=0.0, le=1.0)
    penalty_ramp: float = _d("The penalty ramps in over this fraction of the run's steps", 0.0, ge=0.0, lt=1.0)
    next_iterate_loss: float = _d("Weight mu of the cross-entropy also read at f(z_N)", 0.0, ge=0.0)

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

    dataset: str = _d("Corpus: pydoc or stdlib (offline), wikitext, wikitext-103, a hub id or a local path",
                      "pydoc")
    dataset_config: str | None = _d("Hub dataset configuration name")
    tokenizer: str = _d("Tokenizer: byte, bpe[:SIZE], a hub id or a path", "byte")
    seq_len: int = _d("Tokens per training sequence", DEFAULT_SEQ_LEN, gt=1)
    offline: bool = _d("Never touch the network", False)
    max_vocab_size: int | None = _d("A tokenizer with more tokens than this is refused", gt=0)
    cache_dir: str | None = _d("Where tokenised corpora and trained tokenizers are cached")


class TrainSettings(_Section):
    """The loop. `batch_size` is the micro-batch per process; the effective batch per optimiser step is
    batch_size * grad_accum * world_size sequences. The run stops at whichever of max_steps, epochs and
    max_tokens comes first (at least one must be set)."""

    recipe: Literal["equilibrium", "paper"] = _d("How the model solves and trains (revdeq_cli.recipes): "
                                                 "equilibrium (revdeq's) or paper (the reference "
                                                 "implementation's method)", "equilibrium")
    out_dir: str | None = _d("The run directory")
    max_steps: int | None = _d("Stop after this many optimiser steps", gt=0)
    epochs: float | None = _d("Stop after this many passes over the data", gt=0.0)
    max_tokens: int | None = _d("Stop after this many training tokens", gt=0)
    batch_size: int = _d("Sequences per micro-batch per process", 16, gt=0)
    grad_accum: int = _d("Micro-batches per optimiser step", 1, gt=0)
    lr: float = _d("Peak learning rate", 2e-3, gt=0.0)
    min_lr_ratio: float = _d("The cosine schedule decays to lr * min_lr_ratio", 0.1, ge=0.0, le=1.0)
    weight_decay: float = _d("AdamW weight decay", 0.1, ge=0.0)
    adam_beta1: float = _d("AdamW beta1", 0.9, ge=0.0, lt=1.0)
    adam_beta2: float = _d("AdamW beta2", 0.99, ge=0.0, lt=1.0)
    adam_eps: float = _d("AdamW epsilon", 1e-8, gt=0.0)
    warmup_steps: int | None = _d("Linear learning-rate warm-up, in optimiser steps (auto: follows the run's "
                                  "length)", ge=0)
    schedule: Literal["cosine", "plateau", "constant"] = _d("Learning-rate schedule after the warm-up", "cosine")
    plateau_factor: float = _d("plateau schedule: lr *= factor when the validation loss stalls", 0.5,
                               gt=0.0, lt=1.0)
    plateau_patience: int = _d("plateau schedule: evaluations without improvement before a cut", 2, ge=0)
    grad_clip: float = _d("Most global gradient norm; 0 = no clipping", 1.0, ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _d(
        "Autocast format; auto = bf16 where the device multiplies bfloat16 natively (CUDA >= 8.0, CPUs with AMX "
        "or AVX512-BF16), else fp32, and the run stores what auto chose (training.loop.resolve_precision)", "auto")
    compile: bool = _d("torch.compile the solver's block(s) f (model/compile.py); unavailable or failing: a "
                       "warning, then eager", False)
    device: str = _d("Device: auto, cpu, cuda, cuda:N or mps", "auto")
    seed: int = _d("Random seed", 0)
    eval_every: int = _d("Validate every N optimiser steps; 0 = only at the end", 100, ge=0)
    eval_batches: int | None = _d("Validation during training reads the split's first N batches (none: all of it); "
                                  "the final validation and the test read their whole splits", 64, gt=0)
    eval_batch_size: int | None = _d("Sequences per evaluation batch", gt=0)
    save_every: int = _d("Checkpoint every N optimiser steps; 0 = only at the end (and on Ctrl-C)", 200, ge=0)
    keep_last: int = _d("Checkpoints kept in the run directory (the oldest go first)", 3, gt=0)
    resume: str | None = _d("Continue a run: auto (the newest checkpoint of the run directory) or a checkpoint / "
                            "run directory")
    overwrite: bool = _d("Start afresh in a train.out_dir that holds another run: delete that run's checkpoints, "
                         "logs and config.yaml first (without it such a directory is refused)", False)

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

    progress: Literal["auto", "rich", "plain"] = _d("Progress display; auto = rich on a terminal, plain lines "
                                                    "otherwise", "auto")
    log_every: int = _d("Plain-line and TensorBoard cadence, in optimiser steps", 10, gt=0)
    tensorboard: bool = _d("Write TensorBoard logs", True)


class Settings(_Section):
    """All settings of a run. `Settings().model_dump()` is the YAML written to the run's config.yaml."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="Architecture")
    solver: SolverSettings = Field(default_factory=SolverSettings, description="Fixed-point solver and gradient")
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings, description="The training objective")
    data: DataSettings = Field(default_factory=DataSettings, description="What to train on")
    train: TrainSettings = Field(default_factory=TrainSettings, description="The training loop")
    log: LogSettings = Field(default_factory=LogSettings, description="What the run shows and records")

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
        every model and solver field that is set (vocab_size and preset excluded); the baselines' flat-named
        settings (anderson_m, implicit_*, phantom_steps) become the config's options."""
        from revdeq_cli.model.config import FLAT_OPTIONS, options_from_flat

        out = {k: v for k, v in self.model.model_dump().items()
               if k not in ("preset", "vocab_size") and v is not None}
        solver = {k: v for k, v in self.solver.model_dump().items() if v is not None}
        flat = {name: solver.pop(name) for name in list(solver) if name in FLAT_OPTIONS}
        out.update(options_from_flat(solver.get("solver"), solver.get("adjoint"), flat))
        out.update(solver)
        if out.get("tol") == 0:
            out["tol"] = None  # the model's spelling of "never stop early"
        return out


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSettings, "solver": SolverSettings, "objective": ObjectiveSettings, "data": DataSettings,
    "train": TrainSettings, "log": LogSettings,
}


def _adjoint_rule() -> str:
    by_adjoint: dict[str, list[str]] = {}
    for solver, adjoint in ADJOINT_FOR_SOLVER.items():
        by_adjoint.setdefault(adjoint or "none", []).append(solver)
    return ", ".join(f"{'/'.join(solvers)} -> {adjoint}" for adjoint, solvers in by_adjoint.items())


# What an unset field takes when that is not a constant (resolve_settings derives them; the module docstring of
# revdeq_cli.settings says how). Fields the preset or the recipe fill are found apart (`shown_default`).
FOLLOWS: dict[str, str] = {
    "model.vocab_size": "the tokenizer's",
    "solver.adjoint": f"follows solver.solver: {_adjoint_rule()}",
    "solver.inference_max_steps": "the training depth",
    "data.seq_len": "the model's context, model.max_position_embeddings",
    "data.cache_dir": "$REVDEQ_CACHE_DIR, else the user cache directory",
    "train.out_dir": "runs/<dataset>-<timestamp>",
    "train.max_steps": f"{DEFAULT_MAX_STEPS} when no other limit is set",
    "train.warmup_steps": f"{WARMUP_FRACTION:g} of the run's steps, at most {WARMUP_MAX_STEPS}",
    "train.eval_batch_size": "train.batch_size",
}


def field_info(dotted: str) -> Any:
    """The pydantic `FieldInfo` of a dotted setting (`train.lr`); KeyError for an unknown one."""
    section, _, name = dotted.partition(".")
    return SECTIONS[section].model_fields[name]


def choices(dotted: str) -> tuple[str, ...]:
    """The values a Literal setting takes (`train.precision` -> auto, fp32, bf16, fp16); () for others."""
    annotation = field_info(dotted).annotation
    args = typing.get_args(annotation) if typing.get_origin(annotation) is not Literal else (annotation,)
    return tuple(str(v) for arg in args if typing.get_origin(arg) is Literal for v in typing.get_args(arg))


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown_default(dotted: str) -> str | None:
    """The default of a setting as a user reads it: the model's value, or where a value that follows another
    comes from ("the recipe's", "the preset's", `FOLLOWS`). None where unset means only "not given", and for
    switches (a command line shows their default as the spelling that is in force)."""
    from revdeq_cli.recipes import DEFAULT_RECIPE, RECIPE_PRESET_VALUES, RECIPES

    if dotted in FOLLOWS:
        return FOLLOWS[dotted]
    by_recipe = {name for name, values in RECIPES.items() if dotted in values}
    by_recipe |= {name for (name, _), values in RECIPE_PRESET_VALUES.items() if dotted in values}
    default = field_info(dotted).default
    if isinstance(default, bool):
        return None
    if DEFAULT_RECIPE in by_recipe:
        return "the recipe's"
    if default is None:
        return "the preset's" if dotted.partition(".")[0] in ("model", "solver") else None
    return f"{_plain(default)}, or the recipe's" if by_recipe else _plain(default)


def option_help(dotted: str) -> str:
    """A command-line option's help for setting `dotted`: its description, and its choices where it has a fixed
    set. The default is not part of it (`shown_default`)."""
    text = field_info(dotted).description
    values = choices(dotted)
    return f"{text}. One of: {', '.join(values)}." if values and not all(v in text for v in values) else f"{text}."
