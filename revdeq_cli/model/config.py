"""`RevDEQConfig`: the Hugging Face configuration of a RevDEQ language model and its baselines.

One config describes three kinds of model (DESIGN §2–§3):

* a Reversible DEQ (`solver="reversible"`, `adjoint="reversible"`): the paper's model;
* a classic DEQ (`solver="anderson"|"broyden"|"picard"|"relaxed"`, `adjoint="implicit"|"phantom"|"unrolled"`;
  Anderson and Broyden mix per position, so their reported residual is the largest over positions, not
  over sequences);
* an explicit transformer (`solver="explicit"`, `num_hidden_layers=L` untied blocks): an ordinary GPT.

The config holds what a recipient needs to run the model: sizes, the block's form, the start z0, the solver and
gradient method with their settings, the inference settings and the readout, the cache mode. How the model was
trained (the training objective, its depth draw and penalties) is the run's business: `revdeq_cli.training.
objective` and the run's settings. Values are validated once, when the config is made (`check()`; call it again
after changing fields by hand); impossible ones raise `revdeq_cli.errors.ConfigError` naming the field and the fix.
A `config.json` written before the training objective left the config still loads: `LEGACY_FIELDS` are mapped
once, when it is read (`_from_legacy`).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

from revdeq_cli import deq
from revdeq_cli.errors import ConfigError
from revdeq_cli.model.presets import PRESETS
from revdeq_cli.model.step_rule import StepRule, mean_depth
from revdeq_cli.solver_facts import BETA_HIGH, BETA_LOW, EXPLICIT, SOLVER_FACTS

SOLVERS = (*deq.SOLVERS, EXPLICIT)  # the names and each solver's beta rule: revdeq_cli.solver_facts
ADJOINTS = deq.ADJOINTS
STATE_DTYPES = ("float64", "float32")
INIT_STATES = ("zeros", "input")
CACHE_MODES = ("exact", "fixed_point")
READOUTS = ("z", "midpoint")  # inference_readout: what eval mode reads from the reversible pair (y_N, z_N)
BLOCK_SKIPS = ("state", "input")
# Solvers whose update mixes iterates with per-sample weights. The model solves them with one sample per
# position (so no token's weights see later tokens); the elementwise solvers (Reversible, Picard, Relaxed)
# are causal as they are and keep one sample per sequence, as in the paper (residual over the sequence).
PER_POSITION_SOLVERS = ("anderson", "broyden")
# The keyword arguments `solver_options` / `adjoint_options` may hold, per solver / gradient method, with their
# defaults (the constructor arguments of `deq.Anderson`, `deq.ImplicitAdjoint`, `deq.PhantomAdjoint`).
SOLVER_OPTIONS: dict[str, dict[str, Any]] = {"anderson": {"m": 5}}
ADJOINT_OPTIONS: dict[str, dict[str, Any]] = {"implicit": {"tol": 1e-4, "max_steps": 20},
                                              "phantom": {"steps": 1, "beta": 1.0}}
# Fields of config.json files written before the config held only the model (revdeq 0.1): the training
# objective's (their effect on inference, the depth it trained at, becomes `inference_max_steps`), the baselines'
# solver settings (now `solver_options` / `adjoint_options`) and options that lost their study
# (docs/equilibrium-study.md): at their defaults they are dropped, otherwise the model cannot be built as it was.
LEGACY_FIELDS: dict[str, Any] = {
    "train_steps": None, "train_detached_steps": "0", "train_detached_precision": "same",
    "fixed_point_penalty": 0.0, "fixed_point_penalty_tail": 1.0, "penalty_ramp": 0.0, "jacobian_penalty": 0.0,
    "next_iterate_loss": 0.0, "train_init_noise": 0.0, "train_state_noise": 0.0, "initializer_range": 0.02,
    "output_init_scale": 1.0, "block_output_norm": False,
    "anderson_m": 5, "implicit_tol": 1e-4, "implicit_max_steps": 20, "phantom_steps": 1, "phantom_beta": 1.0,
}
# The baselines' options under their flat names (revdeq 0.1's config fields, today's `solver.*` settings):
# name -> (config field, the solver or gradient method that takes it, its key there).
FLAT_OPTIONS: dict[str, tuple[str, str, str]] = {
    "anderson_m": ("solver_options", "anderson", "m"),
    "implicit_tol": ("adjoint_options", "implicit", "tol"),
    "implicit_max_steps": ("adjoint_options", "implicit", "max_steps"),
    "phantom_steps": ("adjoint_options", "phantom", "steps"),
    "phantom_beta": ("adjoint_options", "phantom", "beta"),
}
_ARCHITECTURE_LEGACY = ("block_output_norm",)  # a non-default value changes the weights: cannot be mapped
INITIALIZER_RANGE = 0.02  # GPT-2's initial standard deviation (`RevDEQPreTrainedModel._init_weights`)


class RevDEQConfig(PreTrainedConfig):
    r"""Configuration of [`RevDEQForCausalLM`].

    Architecture: `vocab_size`, `hidden_size` (width H), `num_attention_heads` (must divide H),
    `intermediate_size` (MLP width, 4H by default), `max_position_embeddings` (context length),
    `num_hidden_layers` (1 for a DEQ; L stacked untied blocks for `solver="explicit"`), `bias` (biases in the
    attention and MLP linears), `layer_norm_eps`, `dropout` (default 0; dropout breaks the exactness of the
    reversible gradient unless its mask is replayed, so keep it 0 for exact gradients), `tie_word_embeddings`
    (head untied by default).

    Start and block (DEQs only): `init_state` = "zeros" (the paper's y0 = z0 = 0) or "input" (z0 = y0 = x, the
    input injection, as in an explicit transformer's residual stream; the fixed point is the same, the truncated
    iterate is not, and the gradient also flows into the embeddings through z0, exactly, under the gradient
    methods that differentiate z0: unrolled and reversible). `block_skip` = "state" (f(z, x) = z + a + m, the
    pre-LN GPT block with the identity skip of the state: the paper's) or "input" (f(z, x) = x + a + m: the skip
    carries the input injection, so f's Jacobian is that of the branches alone, near 0 at initialisation, and the
    iteration contracts); a = Attn(LN1(z + x)), m = MLP(LN2(z + a)) in both.

    Solver: `solver`, `adjoint` (gradient method), `beta` (relaxation, in (0, 2); != 1 for the reversible
    solver), `tol` (stop tolerance on the relative residual in training mode; None = always `max_steps`),
    `max_steps` (solver steps in training mode: the differentiated ones; a training run may first run
    graph-free steps, `forward(detached_steps=...)`), `state_dtype` (the dtype the solver keeps its iterates and
    update arithmetic in, float64 by default as in the paper; f computes in the model dtype), `solver_options`
    (keyword arguments of the solver, `SOLVER_OPTIONS`: Anderson's memory `m`) and `adjoint_options` (of the
    gradient method, `ADJOINT_OPTIONS`: the implicit backward solve's `tol` and `max_steps`, phantom's `steps`
    and `beta`).

    Inference (eval mode and generation): `inference_max_steps` (None = `max_steps`; 0 = z0, the solver
    bypassed; a trained run stores the depth it trained at), `inference_tol` (adaptive depth: each position
    freezes once its own relative residual is below it; cached generation stays equal to full recomputation;
    None = every position runs `inference_max_steps` steps), `inference_readout` ("z" = z_N, as training reads,
    or "midpoint" = (y_N + z_N) / 2 of the reversible pair, with one more evaluation of f for its residual: the
    pair rests on a 2-cycle of f (y = f(z), z = f(y), y != z) as well as at a fixed point, and the midpoint of
    such a cycle is a first-order estimate of the fixed point it straddles; docs/equilibrium-study.md §Midpoint
    readout; the one-iterate solvers read z).

    Generation: `cache_mode` = "exact" (keys/values per evaluation of f; equals full recomputation to float
    rounding) or "fixed_point" (keys/values of the final states only; exact only at convergence).
    """

    model_type = "revdeq"

    vocab_size: int = 50304
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    max_position_embeddings: int = 448
    num_hidden_layers: int = 1
    bias: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_word_embeddings: bool = False
    init_state: str = "zeros"
    block_skip: str = "state"

    solver: str = "reversible"
    adjoint: str = "reversible"
    beta: float = 0.5
    tol: float | None = 1e-3
    max_steps: int = 4
    state_dtype: str = "float64"
    solver_options: dict | None = None
    adjoint_options: dict | None = None
    inference_max_steps: int | None = None
    inference_tol: float | None = None
    inference_readout: str = "z"

    cache_mode: str = "exact"
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs = self._from_legacy(kwargs)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.solver_options = dict(self.solver_options or {})
        self.adjoint_options = dict(self.adjoint_options or {})
        super().__post_init__(**kwargs)
        self.check()

    def _from_legacy(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map the `LEGACY_FIELDS` of an older config.json (in `kwargs`) once, as the config is read: the depth the
        model trained at becomes `inference_max_steps` where that was unset, the baselines' solver settings move
        to `solver_options` / `adjoint_options`, the rest is dropped. Returns the other kwargs."""
        legacy = {name: kwargs.pop(name) for name in list(kwargs) if name in LEGACY_FIELDS}
        if not legacy:
            return kwargs
        for name in _ARCHITECTURE_LEGACY:
            if legacy.get(name, LEGACY_FIELDS[name]) != LEGACY_FIELDS[name]:
                raise ConfigError(f"{name}: {legacy[name]!r} is no longer supported (the option lost its study, "
                                  "docs/equilibrium-study.md); load this model with revdeq 0.1")
        if self.inference_max_steps is None and self.solver != EXPLICIT:
            self.inference_max_steps = legacy_training_depth(self.max_steps, legacy.get("train_steps"),
                                                             legacy.get("train_detached_steps", "0"))
        flat = {name: value for name, value in legacy.items()
                if name in FLAT_OPTIONS and value != LEGACY_FIELDS[name]}
        for field, options in options_from_flat(self.solver, self.adjoint, flat).items():
            setattr(self, field, {**options, **(getattr(self, field) or {})})
        return kwargs

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RevDEQConfig:
        """A preset size (`tiny`, `small`, `base`, `paper`) with `overrides` applied, e.g. `vocab_size=256`.
        The solver is the config's default (the paper's: z0 = 0, the state skip, reversible, beta 0.5, tol 1e-3,
        4 steps) unless an override says otherwise; `revdeq_cli.recipes.model_overrides(recipe, preset)` gives a
        recipe's."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ derived settings
    @property
    def is_deq(self) -> bool:
        """True for a weight-tied equilibrium model, False for the explicit (stacked) baseline."""
        return self.solver != EXPLICIT

    @property
    def reads_midpoint(self) -> bool:
        """Eval mode reads the reversible pair's midpoint: `inference_readout` "midpoint" with the reversible solver
        (the other solvers have one iterate and read z whatever the field says)."""
        return self.solver == "reversible" and self.inference_readout == "midpoint"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eval_max_steps(self) -> int:
        """Solver steps in eval mode and generation: `inference_max_steps`, else `max_steps`."""
        return self.max_steps if self.inference_max_steps is None else self.inference_max_steps

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `deq.make_solver(self.solver, ...)`: beta, state_dtype and `solver_options`."""
        return {"beta": self.beta, "state_dtype": self.state_dtype,
                **{f"{self.solver}_{k}": v for k, v in self.solver_options.items()}}

    def adjoint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `deq.make_adjoint(self.adjoint, ...)`: the solver (its `backward_solver` solves
        the implicit backward system, revdeq_cli.solver_facts) and `adjoint_options` over `ADJOINT_OPTIONS`."""
        options = {**ADJOINT_OPTIONS.get(self.adjoint, {}), **self.adjoint_options}
        return {"solver": self.solver, **{f"{self.adjoint}_{k}": v for k, v in options.items()}}

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise `ConfigError` (naming the field and the fix) if this config cannot work."""
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "num_hidden_layers"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads: {self.num_attention_heads} heads do not divide hidden_size "
                f"{self.hidden_size}; choose a divisor of hidden_size"
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ConfigError(f"layer_norm_eps: must be > 0, got {self.layer_norm_eps!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver: unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.init_state not in INIT_STATES:
            raise ConfigError(f"init_state: must be one of {', '.join(INIT_STATES)}, got {self.init_state!r}")
        if self.block_skip not in BLOCK_SKIPS:
            raise ConfigError(f"block_skip: must be one of {', '.join(BLOCK_SKIPS)}, got {self.block_skip!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"cache_mode: must be one of {', '.join(CACHE_MODES)}, got {self.cache_mode!r}")
        if self.solver == EXPLICIT:
            return
        self._check_solver()

    def _check_solver(self) -> None:
        if self.num_hidden_layers != 1:
            raise ConfigError(
                f"num_hidden_layers: a DEQ has one weight-tied block (got {self.num_hidden_layers}); "
                "set num_hidden_layers: 1, or solver: explicit for a stacked transformer"
            )
        if self.adjoint not in ADJOINTS:
            raise ConfigError(f"adjoint: unknown gradient method {self.adjoint!r}; choose one of {', '.join(ADJOINTS)}")
        if self.adjoint == "reversible" and self.solver != "reversible":
            raise ConfigError(
                f"adjoint: the reversible gradient needs solver: reversible (got solver: {self.solver}); "
                "use adjoint: implicit, phantom or unrolled"
            )
        if not _is_real(self.beta) or not BETA_LOW < self.beta < BETA_HIGH:
            raise ConfigError(f"beta: must be in (0, 2), got {self.beta!r}")
        if self.beta == 1.0 and self.solver in SOLVER_FACTS and not SOLVER_FACTS[self.solver].beta_one_allowed:
            raise ConfigError("beta: 1 makes the reversible step impossible to invert; use e.g. 0.5")
        for name in ("tol", "inference_tol"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not value > 0):
                raise ConfigError(f"{name}: must be > 0 or null (no early stop), got {value!r}")
        _positive_int("max_steps", self.max_steps)
        if self.inference_readout not in READOUTS:
            raise ConfigError(f"inference_readout: must be one of {', '.join(READOUTS)}, "
                              f"got {self.inference_readout!r}")
        if self.inference_max_steps is not None:
            _nonnegative_int("inference_max_steps", self.inference_max_steps)
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(f"state_dtype: must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}")
        _check_options("solver_options", self.solver_options, SOLVER_OPTIONS.get(self.solver, {}), self.solver)
        _check_options("adjoint_options", self.adjoint_options, ADJOINT_OPTIONS.get(self.adjoint, {}), self.adjoint)


def options_from_flat(solver: str, adjoint: str | None, flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`solver_options` / `adjoint_options` from flat-named values (`FLAT_OPTIONS`, None = unset); a value whose
    solver or gradient method is not the one configured is dropped (it would configure nothing)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        field, owner, key = FLAT_OPTIONS[name]
        if value is not None and owner == (solver if field == "solver_options" else adjoint):
            out.setdefault(field, {})[key] = value
    return out


def legacy_training_depth(max_steps: int, train_steps: Any, train_detached_steps: Any) -> int:
    """The solver steps a training batch of a revdeq 0.1 config took on average, rounded up: the differentiated
    steps (`train_steps`, else `max_steps`) plus the mean of `train_detached_steps` (a curriculum's: the one it
    ended the run at). What such a config's eval mode ran when `inference_max_steps` was unset."""
    steps = StepRule.parse(max_steps if train_steps is None else train_steps, field="train_steps", minimum=1)
    detached = StepRule.parse(train_detached_steps, field="train_detached_steps", minimum=0)
    return mean_depth(steps, detached)


def _check_options(field: str, options: Any, allowed: dict[str, Any], owner: str) -> None:
    if not isinstance(options, dict):
        raise ConfigError(f"{field}: must be a mapping of keyword arguments, got {options!r}")
    for key, value in options.items():
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"{field}: {owner} takes no option {key!r} (it takes: {known})")
        if key in ("m", "max_steps", "steps"):
            _positive_int(f"{field}.{key}", value)
        elif not _is_real(value) or not value > 0 or (key == "beta" and not value < 2.0):
            raise ConfigError(f"{field}.{key}: must be a number > 0{' and < 2' if key == 'beta' else ''}, "
                              f"got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nonnegative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name}: must be an integer >= 0 (0 = the solver bypassed, z = z0), got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
