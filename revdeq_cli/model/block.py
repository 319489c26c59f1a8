"""The transformer block that is the equilibrium function f(z, x), and its parts.

    a = CausalSelfAttention(LN1(z + x)),  h = z + a,  m = MLP(LN2(h))     MLP = Linear(H, I) -> GELU -> Linear(I, H)
    f = h + m = z + a + m                     skip "state" (the GPT block: the identity skip of the state)
    f = x + a + m                             skip "input" (the skip carries the input injection instead)

`x` (the token + position embeddings) is injected at every evaluation of a DEQ. For the explicit baseline
`x` is None: the embeddings are the initial state and each block is exactly a GPT-2 block.

Shapes: z, x, f [B, T, H] in the model dtype; keys/values [B, heads, S, H/heads] where S = cached + new
positions. State-dict names inside a block: `ln_1.*`, `attn.c_attn.weight` [3H, H] (q, k, v stacked in
that order), `attn.c_attn.bias` [3H], `attn.c_proj.*` [H, H], `ln_2.*`, `mlp.c_fc.*` [I, H], `mlp.c_proj.*`
[H, I] (linear biases only when `config.bias`; the LayerNorms always have weight and bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Takes this evaluation's new keys and values [B, heads, T, d] and returns the keys and values to attend
# over [B, heads, S, d] (cached ones first). None = attend over the new positions only.
KeyValueHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see.

    `causal=True, mask=None`: query t sees keys 0..t (queries and keys are the same positions).
    `causal=False, mask=None`: every query sees every key (one new token over its cache).
    `mask` [B, 1, T, S] bool: True = may attend (padding, or new tokens after a cache)."""

    causal: bool = True
    mask: Tensor | None = None

    @staticmethod
    def build(past: int, new: int, key_padding: Tensor | None, device: torch.device) -> AttentionMask:
        """The mask for `new` queries at positions past..past+new-1 over keys 0..past+new-1.

        `key_padding` [B, past+new] (1 = real token, 0 = padding) or None. A query always sees itself, so
        padding rows stay finite (their outputs are never used)."""
        if key_padding is None or bool(key_padding.all()):
            if past == 0:
                return AttentionMask(causal=True)
            if new == 1:
                return AttentionMask(causal=False)
            key_padding = None
        q = torch.arange(past, past + new, device=device)[:, None]
        k = torch.arange(past + new, device=device)[None, :]
        allowed = k <= q
        if key_padding is not None:
            allowed = (allowed & key_padding[:, None, None, :].bool()) | (k == q)
        else:
            allowed = allowed[None, None]
        return AttentionMask(causal=False, mask=allowed)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with `scaled_dot_product_attention`."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.c_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def keys_values(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, heads, T, d] of the normalised input `u` [B, T, H]."""
        _, k, v = self._qkv(u)
        return k, v

    def forward(self, u: Tensor, mask: AttentionMask, kv: KeyValueHook | None = None) -> Tensor:
        q, k, v = self._qkv(u)
        if kv is not None:
            k, v = kv(k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.causal and mask.mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        batch, _, length, _ = y.shape
        y = self.c_proj(y.transpose(1, 2).reshape(batch, length, -1))
        # skipping no-op modules matters when decoding one token: per-call overhead dominates there
        return self.resid_dropout(y) if self.dropout else y

    def _qkv(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, hidden = u.shape
        qkv = self.c_attn(u).view(batch, length, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v


class MLP(nn.Module):
    """Linear(H, I) -> GELU -> Linear(I, H) -> dropout."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.c_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, h: Tensor) -> Tensor:
        out = self.c_proj(F.gelu(self.c_fc(h)))
        return self.dropout(out) if self.dropout is not None else out


class Block(nn.Module):
    """f(z, x) = s + a + MLP(LN2(z + a)), a = Attn(LN1(z + x)), s = z (skip "state") or x (skip "input");
    x = None means no input injection (then always s = z: an explicit GPT block)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, *, dropout: float = 0.0,
                 bias: bool = True, eps: float = 1e-5, skip: str = "state"):
        super().__init__()
        self.skip_input = skip == "input"
        self.ln_1 = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = CausalSelfAttention(hidden_size, num_heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, intermediate_size, dropout, bias)

    def attention_input(self, z: Tensor, x: Tensor | None) -> Tensor:
        """LN1(z + x): what the attention sees (its keys/values are what a cache stores)."""
        return self.ln_1(z if x is None else z + x)

    def forward(self, z: Tensor, x: Tensor | None = None, mask: AttentionMask = AttentionMask(),
                kv: KeyValueHook | None = None) -> Tensor:
        a = self.attn(self.attention_input(z, x), mask, kv)
        h = z + a
        if self.skip_input and x is not None:
            return x + a + self.mlp(self.ln_2(h))
        return h + self.mlp(self.ln_2(h))
