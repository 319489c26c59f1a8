"""States as flat per-sample matrices.

A user's state is a Tensor or a tuple of Tensors, each with the batch in dim 0. The solvers work on
one matrix of shape [B, D] (D = all non-batch elements of all parts, concatenated) in the *state
dtype*; `StateSpec` remembers how to cut that matrix back into the user's structure and dtypes (the
*compute dtypes*, in which f runs). The conversions are exact when the state dtype is at least as
wide as every compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

State = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class StateSpec:
    """Shapes and compute dtypes of a state's parts; `is_tuple` says whether it was a tuple."""

    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    is_tuple: bool

    @staticmethod
    def of(state: State, what: str = "z0") -> StateSpec:
        parts = _parts(state, what)
        batch = parts[0].shape[0] if parts[0].dim() else None
        for i, p in enumerate(parts):
            if not p.is_floating_point():
                raise ValueError(f"{what}[{i}] has dtype {p.dtype}; states must be floating point")
            if p.dim() == 0 or p.shape[0] != batch:
                raise ValueError(
                    f"{what}: every part needs the batch in dim 0 (got shapes {[tuple(q.shape) for q in parts]})"
                )
        return StateSpec(tuple(p.shape for p in parts), tuple(p.dtype for p in parts), isinstance(state, tuple))

    @property
    def batch(self) -> int:
        return self.shapes[0][0]

    def flatten(self, state: State, dtype: torch.dtype) -> Tensor:
        """State -> [B, D] in `dtype` (differentiable)."""
        if not self.is_tuple and isinstance(state, Tensor):  # the common case, kept cheap: solvers call it per step
            return state.reshape(self.batch, -1).to(dtype)
        parts = _parts(state, "state")
        flat = [p.reshape(self.batch, -1).to(dtype) for p in parts]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unflatten(self, flat: Tensor) -> State:
        """[B, D] -> the user's structure, each part cast to its compute dtype (differentiable)."""
        if not self.is_tuple:
            return flat.reshape(self.shapes[0]).to(self.dtypes[0])
        sizes = [s[1:].numel() for s in self.shapes]
        chunks = torch.split(flat, sizes, dim=1) if len(sizes) > 1 else (flat,)
        parts = tuple(c.reshape(s).to(d) for c, s, d in zip(chunks, self.shapes, self.dtypes, strict=True))
        return parts if self.is_tuple else parts[0]

    def check(self, out: Any) -> None:
        """Raise a ValueError naming the mismatch if f's output does not have the state's structure."""
        if self.is_tuple != isinstance(out, tuple) or (
            self.is_tuple and len(out) != len(self.shapes)
        ):
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            want = f"a tuple of {len(self.shapes)} Tensors" if self.is_tuple else "a Tensor"
            raise ValueError(f"f(z, x) returned {got}, expected {want} (the same structure as z)")
        for i, (p, shape) in enumerate(zip(_parts(out, "f(z, x)"), self.shapes, strict=True)):
            if p.shape != shape:
                where = f"part {i} of " if self.is_tuple else ""
                raise ValueError(
                    f"f(z, x) returned {where}shape {tuple(p.shape)}, expected {tuple(shape)} (the shape of z)"
                )


def _parts(state: Any, what: str) -> tuple[Tensor, ...]:
    parts = state if isinstance(state, tuple) else (state,)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise ValueError(f"{what} must be a Tensor or a tuple of Tensors, got {type(state).__name__}")
    return parts


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """Per-sample `||z - f(z)|| / (1e-5 + ||f(z)||)` for flat [B, D] states, as float64 [B]."""
    z64, fz64 = z.detach().double(), fz.detach().double()
    norm = torch.linalg.vector_norm
    return norm(z64 - fz64, dim=1) / (1e-5 + norm(fz64, dim=1))


# --- x: any nesting of tuples/lists/dicts whose tensor leaves may need gradients -------------------


def tree_leaves(tree: Any) -> list[Tensor]:
    """Tensor leaves of `x` (tuples, lists and dicts are walked; other values are constants)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in tree_leaves(item)]
    if isinstance(tree, dict):
        return [leaf for key in tree for leaf in tree_leaves(tree[key])]
    return []


def tree_replace(tree: Any, leaves: Sequence[Tensor]) -> Any:
    """`tree` with its tensor leaves replaced, in `tree_leaves` order."""
    return _rebuild(tree, iter(leaves))


def _rebuild(node: Any, leaves: Iterator[Tensor]) -> Any:
    # A module-level function, not a closure that calls itself: that closure would be a reference cycle
    # holding the new leaves (freed only by the cycle collector; this runs in every reversible backward pass).
    if isinstance(node, Tensor):
        return next(leaves)
    if isinstance(node, (tuple, list)):
        return type(node)(_rebuild(item, leaves) for item in node)
    if isinstance(node, dict):
        return {key: _rebuild(node[key], leaves) for key in node}
    return node


Evaluate = Callable[[Tensor], Tensor]
