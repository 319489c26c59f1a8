"""The RevDEQ language model as Hugging Face classes (docs/DESIGN.md §2–§3).

    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM, PRESETS
    model = RevDEQForCausalLM(RevDEQConfig.from_preset("tiny", vocab_size=256))

Importing this package registers the classes with `AutoConfig` / `AutoModelForCausalLM` (model type
"revdeq"), so `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works.
"""

from __future__ import annotations

from revdeq_cli.model.cache import RevDEQCache
from revdeq_cli.model.config import RevDEQConfig
from revdeq_cli.model.modeling import EquilibriumProbe, RevDEQCausalLMOutput, RevDEQForCausalLM, SolverStats
from revdeq_cli.model.presets import PRESETS

__all__ = [
    "EquilibriumProbe",
    "PRESETS",
    "RevDEQCache",
    "RevDEQCausalLMOutput",
    "RevDEQConfig",
    "RevDEQForCausalLM",
    "SolverStats",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Register `RevDEQConfig` and `RevDEQForCausalLM` with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(RevDEQConfig.model_type, RevDEQConfig, exist_ok=True)
    AutoModelForCausalLM.register(RevDEQConfig, RevDEQForCausalLM, exist_ok=True)


register_auto_classes()
