"""`RevDEQConfig`: the Hugging Face configuration of a RevDEQ language model and its baselines.

One config describes three kinds of model (DESIGN §2–§3):

* a Reversible DEQ (`solver="reversible"`, `adjoint="reversible"`): the paper's model;
* a classic DEQ (`solver="anderson"|"broyden"|"picard"|"relaxed"`, `adjoint="implicit"|"phantom"|"unrolled"`;
  Anderson and Broyden mix per position, so their reported residual is the largest over positions, not
  over sequences);
* an explicit transformer (`solver="explicit"`, `num_hidden_layers=L` untied blocks): an ordinary GPT.

The solver settings (`solver`, `adjoint`, `beta`, `tol`, `max_steps`, `inference_max_steps`, `inference_tol`,
`state_dtype`, `anderson_m`, `phantom_steps`, `implicit_*`) are read from `model.config` on every forward
call, so they can be changed on a loaded model without rebuilding it; `check()` runs again at call time.
Impossible values raise `revdeq_cli.errors.ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from transformers import PreTrainedConfig

from revdeq_cli import deq
from revdeq_cli.errors import ConfigError
from revdeq_cli.model.presets import PRESETS
from revdeq_cli.model.step_rule import StepRule
from revdeq_cli.solver_facts import BETA_HIGH, BETA_LOW, EXPLICIT, SOLVER_FACTS

SOLVERS = (*deq.SOLVERS, EXPLICIT)  # the names and each solver's beta rule: revdeq_cli.solver_facts
ADJOINTS = deq.ADJOINTS
STATE_DTYPES = ("float64", "float32")
DETACHED_PRECISIONS = ("same", "bf16", "auto")  # train_detached_precision
INIT_STATES = ("zeros", "input")
CACHE_MODES = ("exact", "fixed_point")
READOUTS = ("z", "midpoint")  # inference_readout: what eval mode reads from the reversible pair (y_N, z_N)
BLOCK_SKIPS = ("state", "input")
# Solvers whose update mixes iterates with per-sample weights. The model solves them with one sample per
# position (so no token's weights see later tokens); the elementwise solvers (Reversible, Picard, Relaxed)
# are causal as they are and keep one sample per sequence, as in the paper (residual over the sequence).
PER_POSITION_SOLVERS = ("anderson", "broyden")


class RevDEQConfig(PreTrainedConfig):
    r"""Configuration of [`RevDEQForCausalLM`].

    Architecture: `vocab_size`, `hidden_size` (width H), `num_attention_heads` (must divide H),
    `intermediate_size` (MLP width, 4H by default), `max_position_embeddings` (context length),
    `num_hidden_layers` (1 for a DEQ; L stacked untied blocks for `solver="explicit"`), `bias` (biases in the
    attention and MLP linears), `layer_norm_eps`, `dropout` (default 0; dropout breaks the exactness of the
    reversible gradient unless its mask is replayed, so keep it 0 for exact gradients), `tie_word_embeddings`
    (head untied by default), `initializer_range`, `output_init_scale` (multiplies the initial standard
    deviation of the blocks' output projections `attn.c_proj` and `mlp.c_proj`; 1 = GPT-2's
    `initializer_range / sqrt(2 * num_hidden_layers)`).

    State initialisation (DEQs only): `init_state` = "zeros" (the paper's y0 = z0 = 0) or "input" (z0 = y0 = x,
    the input injection: the token's own embedding starts in the state, as in an explicit transformer's
    residual stream). The fixed point is the same; the truncated iterate and its gradient are not (with
    "input" the gradient also flows into the embeddings through z0, exactly, under every gradient method that
    differentiates z0: unrolled and reversible).

    Solver: `solver`, `adjoint` (gradient method), `beta` (relaxation, in (0, 2); != 1 for the reversible
    solver), `tol` (training stop tolerance on the relative residual; None = always `max_steps`), `max_steps`
    (training), `inference_max_steps` (steps in eval mode and generation; None = the training depth, see
    `eval_max_steps`), `inference_tol`
    (adaptive depth in eval mode and generation: each position freezes once its own relative residual is below
    it, at most `inference_max_steps` steps; cached generation stays equal to full recomputation; None =
    every position runs `inference_max_steps` steps), `inference_readout` (what eval mode and generation read from
    the reversible solver's pair (y_N, z_N): "z" = z_N, as training does, or "midpoint" = (y_N + z_N) / 2, with
    one more evaluation of f for its residual. The pair is at rest on a 2-cycle of f (y = f(z), z = f(y),
    y != z) as well as at a fixed point; the midpoint of such a cycle is a first-order estimate of the fixed
    point it straddles, and equals z_N where the pair has met; the one-iterate solvers read z), `state_dtype`
    (dtype the solver keeps its iterates and update arithmetic in, float64 by default as in the paper; f always
    computes in the model dtype),
    `anderson_m`, `implicit_tol`, `implicit_max_steps`, `phantom_steps`, `phantom_beta`.

    Block form (DEQs only): `block_skip` = "state" (f(z, x) = z + a + m, the pre-LN GPT block with the identity
    skip of the state; f's Jacobian is I + ..., so the iteration moves z by small increments and its fixed
    point is where the branches cancel) or "input" (f(z, x) = x + a + m: the skip carries the input injection
    instead of the state, so f's Jacobian is that of the branches alone, near 0 at initialisation, and the
    iteration contracts; a = Attn(LN1(z + x)), m = MLP(LN2(z + a)) in both). `block_output_norm` (False) puts a
    LayerNorm LN_out on f's output, f = LN_out(s + a + m) (the output normalisation of the DEQ transformer): the
    iterates are then bounded per position.

    Training depth (DEQs only; training mode only): `train_steps` (None = `max_steps`; else a rule of
    `revdeq_cli.model.step_rule`: "2", "uniform:1-4", "poisson-lognormal:6") is the number of differentiated
    solver steps per optimiser step, `train_detached_steps` (a rule, "0" = none) the steps run first without
    a graph (the recurrent-depth start: the gradient is exact for the differentiated steps from the detached
    state they start at), in the precision `train_detached_precision` says: "same" (as the differentiated
    steps), "bf16" (bfloat16 iterates and f under bfloat16 autocast, the final state cast back: nothing reverses
    those steps, so their rounding only moves the start; round 10 measured it worse, so opt-in) or "auto"
    (bf16 where the device multiplies bfloat16 natively, `deq.precision`: CUDA Ampere or later, CPUs with AMX or
    AVX512-BF16; else "same"). `fixed_point_penalty` (lam >= 0) adds lam * mean over positions of
    ||f(z_N) - z_N||^2 / ||f(z_N)||^2 to the training loss (one more evaluation of f); `fixed_point_penalty_tail`
    (q in (0, 1], 1 = all) averages it over only the fraction q of the batch's positions with the largest residual
    (a CVaR: the few positions that orbit instead of converging decide the max residual, and a mean dilutes them
    by the rest); `jacobian_penalty` (lam)
    adds lam * ||v^T df/dz||^2 / ||v||^2 at the detached z_N, v ~ N(0, I) (Hutchinson; a double backward).
    `next_iterate_loss` (mu >= 0, 0 = off) adds mu x the language-model cross-entropy read at f(z_N), the state one
    full step of the iteration past the solver's output: the readout learns the states past the trained depth
    as well (round 11: perplexity 5.30 -> 4.98 at 8 steps on one seed, 5.08 with the penalty raised to 1 as in the
    presets, and flatter to 32 steps). It costs the output head once more;
    f(z_N) is the fixed-point penalty's evaluation (with the penalty off, one more evaluation of f).
    `penalty_ramp` (r in [0, 1), 0 = off) scales both penalties by min(1, step / (r * total steps)) over the
    run's first fraction r of optimiser steps (`penalty_scale`; the trainer passes it as `penalty_scale=`): a
    strong penalty while the model is far from any fixed point can keep a run from training (round 10). Like
    the learning-rate schedule it follows the planned steps, so a resume with another `max_steps` reschedules it.
    `train_init_noise` (sigma >= 0) starts each training solve from z0 + sigma * rms(x) * eps instead of z0
    (eps ~ N(0, I) from torch's global RNG, which the trainer's checkpoints restore; rms(x) per position over
    the hidden size): the random initialisation of path-independent equilibrium models (Anil et al. 2022), so
    training sees the iteration converge from many starts, not only from z0. `train_state_noise` (sigma) moves
    the state the differentiated steps start from (the end of the detached steps) the same way, so they learn to
    return to the fixed point from near it. Inference always starts at z0, without noise.
    The rules are drawn by the trainer per optimiser step; a plain `model(...)` call in training mode runs
    `max_steps` unless `solver_steps=` / `detached_steps=` are passed.

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
    initializer_range: float = 0.02
    output_init_scale: float = 1.0
    tie_word_embeddings: bool = False
    init_state: str = "zeros"
    block_skip: str = "state"
    block_output_norm: bool = False

    solver: str = "reversible"
    adjoint: str = "reversible"
    beta: float = 0.5
    tol: float | None = 1e-3
    max_steps: int = 4
    inference_max_steps: int | None = None
    inference_tol: float | None = None
    inference_readout: str = "z"
    state_dtype: str = "float64"
    anderson_m: int = 5
    implicit_tol: float = 1e-4
    implicit_max_steps: int = 20
    phantom_steps: int = 1
    phantom_beta: float = 1.0
    train_steps: str | None = None
    train_detached_steps: str = "0"
    train_detached_precision: str = "same"
    fixed_point_penalty: float = 0.0
    fixed_point_penalty_tail: float = 1.0
    penalty_ramp: float = 0.0
    jacobian_penalty: float = 0.0
    next_iterate_loss: float = 0.0
    train_init_noise: float = 0.0
    train_state_noise: float = 0.0

    cache_mode: str = "exact"
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)
        self.check()

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RevDEQConfig:
        """A preset (`tiny`, `small`, `base`, `paper`) with `overrides` applied, e.g. `vocab_size=256`."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ derived settings
    @property
    def is_deq(self) -> bool:
        """True for a weight-tied equilibrium model, False for the explicit (stacked) baseline."""
        return self.solver != "explicit"

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
        """Solver steps in eval mode and generation: `inference_max_steps`, else `training_depth`."""
        return self.training_depth if self.inference_max_steps is None else self.inference_max_steps

    @property
    def training_depth(self) -> int:
        """The solver steps a training batch takes on average, rounded up: `max_steps` (or the mean of the
        `train_steps` rule) plus the mean of `train_detached_steps` (a curriculum's: the one it ends the run at);
        `max_steps` for a config without rules."""
        steps, detached = self.step_rules()
        return max(1, math.ceil(steps.mean_value + detached.mean_value - 1e-9))

    def step_rules(self) -> tuple[StepRule, StepRule]:
        """(differentiated steps, detached steps) per training batch, parsed from `train_steps` (None:
        `max_steps`, fixed) and `train_detached_steps`. Raises `ConfigError` naming the field."""
        return _step_rules(self.max_steps, self.train_steps, self.train_detached_steps)

    def penalty_scale(self, step: int, total_steps: int | None, progress: float | None = None) -> float:
        """The factor on the training penalties at optimiser step `step` (0-based) of a run of `total_steps`
        (None: unknown, no ramp): min(1, step / (penalty_ramp * total_steps)), 1 when `penalty_ramp` is 0.
        `progress` in [0, 1], if given, is how far through the run the step is on a clock of the caller's own
        (a run to a time budget has no planned steps): min(1, progress / penalty_ramp)."""
        if progress is not None:
            return 1.0 if self.penalty_ramp <= 0 else min(1.0, max(float(progress), 0.0) / self.penalty_ramp)
        span = self.penalty_ramp * total_steps if total_steps else 0.0
        return 1.0 if span <= 0 else min(1.0, step / span)

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
        if not _is_real(self.output_init_scale) or not self.output_init_scale > 0:
            raise ConfigError(f"output_init_scale: must be > 0, got {self.output_init_scale!r}")
        self.check_solver()

    def check_solver(self) -> None:
        """The solver part of `check()`; also run on every forward call (settings may change after loading)."""
        # Per forward call means per generated token: remember the settings already found valid. Plain dict
        # reads, because attribute access on a PretrainedConfig costs microseconds each.
        values = self.__dict__
        try:
            key = tuple((values[name], type(values[name])) for name in _SOLVER_FIELDS)  # True == 1, 1.0 == 1
            if key in _VALID_SOLVER_SETTINGS:
                return
        except (KeyError, TypeError):  # a field set on the class only, or an unhashable (hence invalid) value
            key = None
        self._check_solver_fields()
        if key is not None and len(_VALID_SOLVER_SETTINGS) < 1024:
            _VALID_SOLVER_SETTINGS.add(key)

    def _check_solver_fields(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver: unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.init_state not in INIT_STATES:
            raise ConfigError(f"init_state: must be one of {', '.join(INIT_STATES)}, got {self.init_state!r}")
        if self.block_skip not in BLOCK_SKIPS:
            raise ConfigError(f"block_skip: must be one of {', '.join(BLOCK_SKIPS)}, got {self.block_skip!r}")
        if not isinstance(self.block_output_norm, bool):
            raise ConfigError(f"block_output_norm: must be true or false, got {self.block_output_norm!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(f"cache_mode: must be one of {', '.join(CACHE_MODES)}, got {self.cache_mode!r}")
        if self.solver == "explicit":
            return
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
        self.step_rules()
        for name in ("fixed_point_penalty", "jacobian_penalty", "next_iterate_loss", "train_init_noise",
                     "train_state_noise"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ConfigError(f"{name}: must be a number >= 0 (0 = off), got {value!r}")
        if self.train_detached_precision not in DETACHED_PRECISIONS:
            raise ConfigError(f"train_detached_precision: must be one of {', '.join(DETACHED_PRECISIONS)}, "
                              f"got {self.train_detached_precision!r}")
        ramp = self.penalty_ramp
        if not _is_real(ramp) or not 0.0 <= ramp < 1.0:
            raise ConfigError(f"penalty_ramp: must be in [0, 1) (a fraction of the run's steps; 0 = off), got {ramp!r}")
        tail = self.fixed_point_penalty_tail
        if not _is_real(tail) or not 0.0 < tail <= 1.0:
            raise ConfigError(f"fixed_point_penalty_tail: must be in (0, 1] (1 = every position), got {tail!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(f"state_dtype: must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}")
        _positive_int("anderson_m", self.anderson_m)
        _positive_int("implicit_max_steps", self.implicit_max_steps)
        _positive_int("phantom_steps", self.phantom_steps)
        if not _is_real(self.phantom_beta) or not 0.0 < self.phantom_beta < 2.0:
            raise ConfigError(f"phantom_beta: must be in (0, 2), got {self.phantom_beta!r}")
        if not _is_real(self.implicit_tol) or not self.implicit_tol > 0:
            raise ConfigError(f"implicit_tol: must be > 0, got {self.implicit_tol!r}")


_SOLVER_FIELDS = (
    "solver", "init_state", "cache_mode", "num_hidden_layers", "adjoint", "beta", "tol", "inference_tol", "max_steps",
    "inference_max_steps", "state_dtype", "anderson_m", "implicit_max_steps", "phantom_steps", "phantom_beta",
    "implicit_tol", "block_skip", "block_output_norm", "train_steps", "train_detached_steps", "fixed_point_penalty",
    "train_detached_precision", "fixed_point_penalty_tail", "penalty_ramp", "jacobian_penalty", "next_iterate_loss",
    "train_init_noise", "train_state_noise", "inference_readout",
)
_VALID_SOLVER_SETTINGS: set[tuple[Any, ...]] = set()


@functools.lru_cache(maxsize=64)  # eval_max_steps reads the rules per forward call, so per generated token
def _step_rules(max_steps: Any, train_steps: Any, train_detached_steps: Any) -> tuple[StepRule, StepRule]:
    steps = StepRule.parse(max_steps if train_steps is None else train_steps, field="train_steps", minimum=1)
    detached = StepRule.parse(train_detached_steps, field="train_detached_steps", minimum=0)
    return steps, detached


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nonnegative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name}: must be an integer >= 0 (0 = the solver bypassed, z = z0), got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
