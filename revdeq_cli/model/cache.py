"""Key/value caches for incremental decoding of a RevDEQ language model.

**Exact cache** (`mode="exact"`). In the full-sequence solve with a fixed number of steps (`tol=None`), the
k-th evaluation of f at position t attends to the keys/values that the same k-th evaluation computed at
positions <= t, and the solver update is elementwise in the position. So one new token can be run through
the same evaluations for its own position only, with cache layer k holding the keys/values of evaluation k:
the cache a (1 + 2N)-layer explicit model keeps (N reversible steps). Its logits equal full recomputation to
float rounding, whether or not the solver converged. Prefill and every decode step must use the same solver
settings; the cache records them and refuses a change. The explicit baseline uses the same cache with one
layer per block.

**Fixed-point cache** (`mode="fixed_point"`). Layer 0 holds the keys/values of the final states z* only (1
layer instead of 1 + 2N); each new token is solved to tolerance against them. It is exact only when every
solve converged (a converged z* satisfies z* = f(z*), whose attention sees the final states of earlier
positions), so its outputs are approximate.

**Adaptive depth** (`inference_tol` set, exact mode). Each position freezes once its own residual is below
the tolerance: its states stop changing, so every later evaluation of f computes the same keys/values for it
as its last evaluation of the same state (the reversible solver alternates evaluations at y and at z, so the
one two evaluations earlier; the others the one before). The full forward keeps evaluating frozen positions
(f runs on the whole sequence); a decoding solve that stops early, when all its new positions are frozen,
leaves the layers of the evaluations it skipped short. A later solve that runs evaluation k first extends
layer k over the positions it lacks with their held keys/values, copied from layer k - e (e = evaluations
per step: the same state's previous evaluation; `EvaluationKeyValues`), so layer k holds, for every
position, what evaluation k of the full forward saw there. Cached decoding equals full recomputation under
adaptive depth too (each position's trajectory, and so when it freezes,
depends only on positions <= t). One caveat, as for any threshold: a residual within rounding of the
tolerance may freeze one step apart in the two computations.

Both need a solver update that is causal in the position: Reversible, Picard and Relaxed are elementwise;
the model solves Anderson and Broyden with one sample per position (see `RevDEQForCausalLM._solve`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare capacity instead of concatenating: an update copies only the
    new positions (a decode step would otherwise copy every cached key/value of every evaluation layer).

    `keys`/`values` are views [B, heads, S, d] of buffers [B, heads, capacity, d] that double when full. After
    `crop` the next update overwrites the cropped positions; after operations that replace `keys` (beam
    reordering, batch selection) the buffer is rebuilt from them. With autograd recording it falls back to
    concatenation, so no in-place write touches a tensor the graph saved."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        keys, new = self.keys, key_states.shape[-2]
        length = keys.shape[-2] if keys.dim() == 4 else 0
        buffer = self._key_buffer
        # The buffer is still ours only while `keys` is a view of it (crop and appends keep that; beam
        # reordering or batch selection replace `keys` with a new tensor). A buffer made in inference mode (the
        # model decodes in it) can only be written in inference mode: outside it, copy to an ordinary one.
        if (
            buffer is None or buffer.shape[2] < length + new or (length and keys.data_ptr() != buffer.data_ptr())
            or buffer.shape[0] != key_states.shape[0] or buffer.dtype != key_states.dtype
            or buffer.device != key_states.device
            or (buffer.is_inference() and not torch.is_inference_mode_enabled())
        ):
            self._key_buffer = self._grow(keys, key_states, length, length + new)
            self._value_buffer = self._grow(self.values, value_states, length, length + new)
        self._key_buffer[:, :, length : length + new] = key_states
        self._value_buffer[:, :, length : length + new] = value_states
        self.keys = self._key_buffer[:, :, : length + new]
        self.values = self._value_buffer[:, :, : length + new]
        return self.keys, self.values

    @staticmethod
    def _grow(cached: Tensor, new: Tensor, length: int, needed: int) -> Tensor:
        batch, heads, _, dim = new.shape
        buffer = new.new_empty(batch, heads, max(2 * needed, 64), dim)
        if length:
            buffer[:, :, :length] = cached
        return buffer


class RevDEQCache(DynamicCache):
    """A `DynamicCache` whose layer k holds the keys/values [B, heads, S, d] of the k-th evaluation of f
    (mode "exact") or of the final states (mode "fixed_point", one layer).

    `settings` records the solver settings the cache was filled with (set at prefill); `num_evaluations`
    the number of evaluations of f per solve (exact mode)."""

    def __init__(self, mode: str = "exact") -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
        if mode not in ("exact", "fixed_point"):
            raise ValueError(f"mode must be 'exact' or 'fixed_point', got {mode!r}")
        self.mode = mode
        self.settings: tuple[Any, ...] | None = None
        self.num_evaluations: int | None = None

    def claim(self, settings: tuple[Any, ...]) -> None:
        """Record the solver settings at prefill; afterwards refuse different ones (the cached keys/values
        would no longer belong to the same computation)."""
        if self.settings is None or self.get_seq_length() == 0:
            self.settings = settings
            self.num_evaluations = None
        elif settings != self.settings:
            raise ValueError(
                f"cache: filled with solver settings {self.settings}, now called with {settings}; "
                "start a new cache (or generate call) after changing the solver settings"
            )

    def past_keys_values(self) -> tuple[Tensor, Tensor] | None:
        """Layer 0's keys and values, or None while empty (fixed-point mode)."""
        if not self.layers or self.get_seq_length() == 0:
            return None
        return self.layers[0].keys, self.layers[0].values


class EvaluationKeyValues:
    """A `KeyValueHook` that gives the k-th call (evaluation of f, or block k) cache layer k: it appends the
    new keys/values there and returns all of that layer's keys/values.

    Adaptive depth: layer k may be shorter than the `past` positions before this call (their solves ended
    before evaluation k). It is first extended with the held keys/values of the same state, layer
    k - `per_step`'s entries for those positions (the module docstring)."""

    def __init__(self, cache: RevDEQCache, past: int = 0, per_step: int = 1) -> None:
        self.cache = cache
        self.calls = 0
        self.past = past
        self.per_step = per_step

    def next_layer(self, k: int) -> None:
        """The next call reads and extends layer k (the midpoint readout's evaluation keeps the last layer, whatever
        step an adaptive solve stopped at); later calls follow on from k + 1."""
        self.calls = k

    def __call__(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        layers, k = self.cache.layers, self.calls
        self.calls += 1
        if k < len(layers):  # straight to the layer: this runs once per evaluation of f per generated token
            layer = layers[k]
            have = layer.get_seq_length()
            if have < self.past and k >= self.per_step:
                source = layers[k - self.per_step]
                layer.update(source.keys[:, :, have : self.past], source.values[:, :, have : self.past])
            return layer.update(keys, values)
        if self.past and k >= self.per_step:  # a layer no solve reached before: all of it is held entries
            source = layers[k - self.per_step]
            self.cache.update(source.keys[:, :, : self.past], source.values[:, :, : self.past], k)
        return self.cache.update(keys, values, k)


class PastKeyValues:
    """A `KeyValueHook` that attends over fixed past keys/values followed by the new ones (stores nothing)."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        self.keys = keys
        self.values = values

    def __call__(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)
