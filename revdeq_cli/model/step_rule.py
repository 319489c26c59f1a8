"""How many solver steps a training batch takes: a fixed count or a distribution, drawn per optimiser step.

A rule is written as text, so it fits a config file, `--set` and `config.json`:

    "2"                          always 2
    "uniform:1-4"                1, 2, 3 or 4, equally likely
    "poisson-lognormal:8"        k ~ Poisson(exp(tau)), tau ~ Normal(log(8) - sigma^2 / 2, sigma), sigma = 0.5,
                                 so E[k] = 8 before clipping; clipped to [low, 4 * 8] (heavy-tailed, as the
                                 recurrent-depth language models of Geiping et al. 2025 train their depth)
    "poisson-lognormal:8:24"     the same, clipped at 24
    "poisson-lognormal:8:48:1"   mean 8, clipped at 48, sigma = 1: a heavier tail at the same mean (more deep
                                 draws per step of average cost; P(k >= 24) 6.2% against 1.3% for sigma 0.5,
                                 docs/equilibrium-study.md)
    "poisson-lognormal:0-18:48"  a depth curriculum: the mean grows linearly over the run, from 0 at the first
                                 optimiser step to 18 at the last (a mean of 0 gives 0 steps); the cap and
                                 sigma as above, the default cap 4 * 18. The same average cost as mean 9,
                                 with the deep draws late in training.

The training objective holds two rules (`training/objective.py`: the differentiated steps, `solver.max_steps`,
and `objective.detached_steps`, steps run first without a graph); it draws both once per optimiser step from a
generator seeded by (seed, step), so every rank draws the same counts and a resumed run draws what the
uninterrupted run drew. A
curriculum also reads the run's planned length (the trainer's `total_steps`, from the settings): a run resumed
with another length continues on the new ramp, as its learning-rate schedule does, and a run with no planned
end (e.g. to a time budget) would sit at START, so give one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from revdeq_cli.errors import ConfigError

_SIGMA = 0.5
_PATTERNS = (
    ("fixed", re.compile(r"^(\d+)$")),
    ("uniform", re.compile(r"^uniform:(\d+)-(\d+)$")),
    ("poisson-lognormal",
     re.compile(r"^poisson-lognormal:(?:(\d+(?:\.\d+)?)-)?(\d+(?:\.\d+)?)(?::(\d+)(?::(\d+(?:\.\d+)?))?)?$")),
)


@dataclass(frozen=True)
class StepRule:
    """A parsed rule (see the module docstring). `low` is the smallest count it may give (0 or 1); `sigma` the
    Poisson-lognormal's log-scale spread; `ramp_from`, for a curriculum, its mean at the start of the run
    (`mean_value` is then the mean at the end)."""

    kind: str
    low: int
    high: int
    mean_value: float = 0.0
    sigma: float = _SIGMA
    ramp_from: float | None = None

    @classmethod
    def parse(cls, text: str | int, *, field: str, minimum: int) -> StepRule:
        """Parse `text`; `minimum` is the least count the field allows. Raises `ConfigError` naming `field`."""
        spec = str(text).strip().lower()
        for kind, pattern in _PATTERNS:
            match = pattern.match(spec)
            if match is None:
                continue
            if kind == "fixed":
                n = int(match.group(1))
                rule = cls("fixed", n, n, float(n))
            elif kind == "uniform":
                low, high = int(match.group(1)), int(match.group(2))
                if high < low:
                    raise ConfigError(f"{field}: uniform:{low}-{high} has its bounds the wrong way round; "
                                      f"write uniform:{high}-{low}")
                rule = cls("uniform", low, high, (low + high) / 2)
            else:
                start = float(match.group(1)) if match.group(1) else None
                mean = float(match.group(2))
                high = int(match.group(3)) if match.group(3) else max(1, math.ceil(4 * mean))
                sigma = float(match.group(4)) if match.group(4) else _SIGMA
                if mean <= 0:
                    raise ConfigError(f"{field}: the poisson-lognormal mean must be > 0, got {mean:g}")
                if start is not None and start > mean:
                    raise ConfigError(f"{field}: the curriculum {start:g}-{mean:g} falls; its mean must rise "
                                      "from the start of the run to its end (START-END with START <= END)")
                if not 0 < sigma <= 3:
                    raise ConfigError(f"{field}: the poisson-lognormal sigma must be in (0, 3], got {sigma:g}")
                rule = cls("poisson-lognormal", minimum, high, mean, sigma, start)
            if rule.low < minimum:
                raise ConfigError(f"{field}: {spec!r} can give {rule.low} steps; at least {minimum} are needed")
            if rule.high < rule.low:
                raise ConfigError(f"{field}: {spec!r} caps the count below {rule.low}; raise the cap")
            return rule
        raise ConfigError(
            f"{field}: {text!r} is not a step rule; write a count (2), uniform:LOW-HIGH (uniform:1-4) or "
            "poisson-lognormal:[START-]MEAN[:MAX[:SIGMA]] (poisson-lognormal:6)"
        )

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    def mean_at(self, progress: float) -> float:
        """The mean before clipping at `progress` in [0, 1] through the run (constant unless a curriculum)."""
        if self.ramp_from is None:
            return self.mean_value
        progress = min(max(float(progress), 0.0), 1.0)
        return self.ramp_from + (self.mean_value - self.ramp_from) * progress

    def draw(self, generator: torch.Generator, progress: float = 1.0) -> int:
        """One count from the rule, using only `generator` (CPU); `progress` in [0, 1] places a curriculum's
        draw in the run (ignored by the other rules)."""
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return int(torch.randint(self.low, self.high + 1, (), generator=generator))
        mean = self.mean_at(progress)
        if mean <= 0:
            return self.low
        tau = torch.normal(math.log(mean) - self.sigma**2 / 2, self.sigma, (1,), generator=generator)
        k = int(torch.poisson(tau.exp(), generator=generator))
        return min(max(k, self.low), self.high)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.low)
        if self.kind == "uniform":
            return f"uniform:{self.low}-{self.high}"
        start = "" if self.ramp_from is None else f"{self.ramp_from:g}-"
        text = f"poisson-lognormal:{start}{self.mean_value:g}:{self.high}"
        # sigma 0.5 is written without it, so rules saved before the field existed read back unchanged
        return text if self.sigma == _SIGMA else f"{text}:{self.sigma:g}"


def mean_depth(steps: StepRule, detached: StepRule) -> int:
    """The solver steps a training batch takes on average, rounded up: the differentiated `steps` plus the
    graph-free `detached` (a curriculum's mean at the end of the run): the depth a trained model reads at."""
    return max(1, math.ceil(steps.mean_value + detached.mean_value - 1e-9))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator the trainer draws optimiser step `step`'s counts from: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63))


def draw_depth(rules: tuple[StepRule, StepRule] | None, seed: int, step: int,
               total_steps: int | None = None, progress: float | None = None) -> dict[str, int]:
    """The forward keyword arguments (`solver_steps`, `detached_steps`) for optimiser step `step` (0-based) of
    a run with `seed` and `total_steps` steps (None: a curriculum is at its end), from the rules (differentiated,
    graph-free; `training.objective.TrainingObjective.rules`); {} for a model without a solver (rules None).
    `progress` in [0, 1], if given, places a curriculum's draw in the run instead of step / (total_steps - 1) (a
    run on a clock of its own, e.g. a time budget); the draw itself still comes from the (seed, step) generator."""
    if rules is None:
        return {}
    if progress is None:
        progress = 1.0 if not total_steps or total_steps <= 1 else step / (total_steps - 1)
    generator = step_generator(seed, step)
    return {"solver_steps": rules[0].draw(generator, progress), "detached_steps": rules[1].draw(generator, progress)}
