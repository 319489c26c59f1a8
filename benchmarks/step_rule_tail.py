"""How often a step rule draws a deep count: the mean and P(k >= 24), P(k >= 32) over 100,000 draws of
`StepRule.draw` (the trainer's own sampler), for the detached-start rules of the equilibrium study.

    .venv/bin/python benchmarks/step_rule_tail.py [RULE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from revdeq_cli.model.step_rule import StepRule

    rules = sys.argv[1:] or ["poisson-lognormal:6:24", "poisson-lognormal:12:48"]
    print("| rule | mean | P(k >= 24) | P(k >= 32) |")
    print("|---|---:|---:|---:|")
    for text in rules:
        rule = StepRule.parse(text, field="rule", minimum=0)
        generator = torch.Generator().manual_seed(0)
        draws = torch.tensor([rule.draw(generator) for _ in range(100_000)], dtype=torch.float64)
        print(f"| {text} | {draws.mean():.2f} | {(draws >= 24).double().mean():.2%} | "
              f"{(draws >= 32).double().mean():.2%} |")


if __name__ == "__main__":
    main()
