"""Which reduced precision a device multiplies natively, for work that needs no exactness.

    dtype = native_low_precision(torch.device("cpu"))   # torch.bfloat16 on AMX CPUs, else None

The graph-free (detached) steps of a training solve only pick where the differentiated steps start: nothing
reverses them, so they need neither float64 states nor float32 products. Where the hardware has bfloat16
matrix units they run faster in bfloat16; elsewhere bfloat16 is emulated and slower than
float32, so the answer there is None (keep the solve's own precision).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)  # asked per training forward
def native_low_precision(device: torch.device | str) -> torch.dtype | None:
    """torch.bfloat16 where `device` multiplies bfloat16 matrices in hardware, else None.

    CUDA: compute capability >= 8.0 (Ampere and later: bf16 tensor cores). CPU: Intel AMX tiles (Sapphire
    Rapids and later): a detached step of the tiny preset's block measured about 11 ms against 20 ms in float32
    (README "Round 10"; a whole default run only about 10% faster, and worse: the option stays opt-in); CPUs
    with only AVX512-BF16 or none, Apple GPUs (mps) and other devices: None (not measured, or emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0) \
            else None
    if device.type == "cpu":
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded: absent -> not known
        try:
            return torch.bfloat16 if is_amx is not None and is_amx() else None
        except RuntimeError:
            return None
    return None
