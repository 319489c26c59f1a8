"""revdeq: Reversible Deep Equilibrium Models in PyTorch.

    from revdeq_cli import deq                                # the solver core (torch only)
    from revdeq_cli import RevDEQConfig, RevDEQForCausalLM    # the Hugging Face model

After `import revdeq_cli`, `AutoConfig` / `AutoModelForCausalLM` know the "revdeq" model type. Importing
transformers costs seconds, so this module does not import it: if transformers is already loaded the
classes are registered now, otherwise a one-shot import hook registers them the moment transformers
finishes loading. `revdeq --help` and shell completion therefore stay fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from importlib import import_module
from typing import Any

from revdeq_cli.version import __version__

__all__ = ["deq", "RevDEQConfig", "RevDEQForCausalLM", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "deq":
        return import_module("revdeq_cli.deq")
    if name in ("RevDEQConfig", "RevDEQForCausalLM"):
        return getattr(import_module("revdeq_cli.model"), name)
    raise AttributeError(f"module 'revdeq_cli' has no attribute {name!r}")


def _register_auto_classes() -> None:
    # revdeq_cli.model registers the classes when it is imported. If it is being imported right now
    # (it imports transformers itself), it finishes the registration on its own.
    if "revdeq_cli.model" in sys.modules:
        return
    try:
        import_module("revdeq_cli.model")
    except Exception as err:  # never break the user's `import transformers`
        warnings.warn(f"revdeq: could not register the 'revdeq' model type with transformers: {err}", stacklevel=2)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Import hook: after `transformers` has executed, register our Auto classes (once)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_original = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            exec_original(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(finder, _RegisterWhenTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
