"""revdeq: Reversible Deep Equilibrium Models in PyTorch.

`from revdeq_cli import deq` gives the solver core (torch only). Importing the package also
registers `RevDEQConfig` / `RevDEQForCausalLM` with the Hugging Face Auto classes; that import
is lazy so `revdeq --help` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

__all__ = ["deq", "RevDEQConfig", "RevDEQForCausalLM", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "deq":
        return import_module("revdeq_cli.deq")
    if name in ("RevDEQConfig", "RevDEQForCausalLM"):
        return getattr(import_module("revdeq_cli.model"), name)
    raise AttributeError(f"module 'revdeq_cli' has no attribute {name!r}")
