"""The fixed-point problem `z = f(z, x)` seen from inside the solvers.

`Problem.evaluate(z_flat)` takes a flat [B, D] state in the state dtype, rebuilds the user's structure
in the compute dtypes, calls `f(z, x)` under the caller's autocast setting, checks the result's structure
and returns it flat in the state dtype. It counts evaluations, so every solver and gradient method
reports the same `nfe`. The solver arithmetic around it runs with autocast *off*, in the state dtype
(docs/DESIGN.md §1: under bf16/fp16 autocast the update arithmetic still runs in the state dtype, float64 by
default for the Reversible solver).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from revdeq_cli.deq.state import State, StateSpec, tree_replace


@dataclass(frozen=True)
class AutocastState:
    """The caller's autocast setting for one device type, captured at `solve` time so the backward
    pass (which autograd may run with another setting) evaluates f exactly as the forward did."""

    device_type: str
    enabled: bool
    dtype: torch.dtype | None

    @staticmethod
    def capture(device_type: str) -> AutocastState:
        if device_type not in ("cpu", "cuda", "mps", "xpu"):
            return AutocastState(device_type, False, None)
        enabled = torch.is_autocast_enabled(device_type)
        return AutocastState(device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None)

    def f_context(self) -> contextlib.AbstractContextManager:
        """The caller's setting, re-entered (the backward pass may run under another one)."""
        if not self.enabled:
            return self.off_context()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def off_context(self) -> contextlib.AbstractContextManager:
        """Autocast off. When the caller had it off already, entering nothing is cheaper (decoding one
        token at a time pays this per evaluation)."""
        if not self.enabled or self.device_type not in ("cpu", "cuda", "mps", "xpu"):
            return _NOTHING
        return torch.autocast(self.device_type, enabled=False)


_NOTHING = contextlib.nullcontext()  # reusable: entering and leaving it does nothing


@dataclass
class Problem:
    """f, its input x, the state layout and dtype, and an evaluation counter."""

    f: Callable[[State, Any], State]
    x: Any
    spec: StateSpec
    state_dtype: torch.dtype
    autocast: AutocastState
    trace: bool = True  # record the residual after every step (see `solve`)
    nfe: int = 0
    _checked: bool = field(default=False, repr=False)

    def evaluate(self, z: Tensor, x: Any = None) -> Tensor:
        """f at the flat state `z` [B, D] (state dtype) -> f(z) flat [B, D] in the state dtype.

        `x` overrides the stored input (the backward passes copies that require grad)."""
        self.nfe += 1
        x = self.x if x is None else x
        if not self.autocast.enabled:  # the common case without context managers: it runs per evaluation
            out = self.f(self.spec.unflatten(z), x)
        else:
            with self.autocast.f_context():
                out = self.f(self.spec.unflatten(z), x)
        if not self._checked:
            self.spec.check(out)
            self._checked = True
        with self.autocast.off_context():
            return self.spec.flatten(out, self.state_dtype)

    def with_x(self, leaves: list[Tensor]) -> Any:
        return tree_replace(self.x, leaves)

    def arithmetic(self) -> contextlib.AbstractContextManager:
        """Context for solver update arithmetic: autocast off, so it stays in the state dtype."""
        return self.autocast.off_context()
