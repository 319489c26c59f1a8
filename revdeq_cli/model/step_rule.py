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
                                 `python benchmarks/step_rule_tail.py`)

The model reads two rules (`RevDEQConfig.train_steps`, the differentiated steps, and `train_detached_steps`,
steps run first without a graph); the trainer draws both once per optimiser step from a generator seeded by
(seed, step), so every rank draws the same counts and a resumed run draws what the uninterrupted run drew.
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
    ("poisson-lognormal", re.compile(r"^poisson-lognormal:(\d+(?:\.\d+)?)(?::(\d+)(?::(\d+(?:\.\d+)?))?)?$")),
)


@dataclass(frozen=True)
class StepRule:
    """A parsed rule (see the module docstring). `low` is the smallest count it may give (0 or 1); `sigma` the
    Poisson-lognormal's log-scale spread."""

    kind: str
    low: int
    high: int
    mean_value: float = 0.0
    sigma: float = _SIGMA

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
                mean = float(match.group(1))
                high = int(match.group(2)) if match.group(2) else max(1, math.ceil(4 * mean))
                sigma = float(match.group(3)) if match.group(3) else _SIGMA
                if mean <= 0:
                    raise ConfigError(f"{field}: the poisson-lognormal mean must be > 0, got {mean:g}")
                if not 0 < sigma <= 3:
                    raise ConfigError(f"{field}: the poisson-lognormal sigma must be in (0, 3], got {sigma:g}")
                rule = cls("poisson-lognormal", minimum, high, mean, sigma)
            if rule.low < minimum:
                raise ConfigError(f"{field}: {spec!r} can give {rule.low} steps; at least {minimum} are needed")
            if rule.high < rule.low:
                raise ConfigError(f"{field}: {spec!r} caps the count below {rule.low}; raise the cap")
            return rule
        raise ConfigError(
            f"{field}: {text!r} is not a step rule; write a count (2), uniform:LOW-HIGH (uniform:1-4) or "
            "poisson-lognormal:MEAN[:MAX[:SIGMA]] (poisson-lognormal:6)"
        )

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    def draw(self, generator: torch.Generator) -> int:
        """One count from the rule, using only `generator` (CPU)."""
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return int(torch.randint(self.low, self.high + 1, (), generator=generator))
        tau = torch.normal(math.log(self.mean_value) - self.sigma**2 / 2, self.sigma, (1,), generator=generator)
        k = int(torch.poisson(tau.exp(), generator=generator))
        return min(max(k, self.low), self.high)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.low)
        if self.kind == "uniform":
            return f"uniform:{self.low}-{self.high}"
        text = f"poisson-lognormal:{self.mean_value:g}:{self.high}"
        # sigma 0.5 is written without it, so rules saved before the field existed read back unchanged
        return text if self.sigma == _SIGMA else f"{text}:{self.sigma:g}"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator the trainer draws optimiser step `step`'s counts from: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63))


def draw_depth(rules: tuple[StepRule, StepRule] | None, seed: int, step: int) -> dict[str, int]:
    """The forward keyword arguments (`solver_steps`, `detached_steps`) for optimiser step `step` of a run
    with `seed`, from a config's `step_rules()`; {} for a model without a solver (rules None)."""
    if rules is None:
        return {}
    generator = step_generator(seed, step)
    return {"solver_steps": rules[0].draw(generator), "detached_steps": rules[1].draw(generator)}
