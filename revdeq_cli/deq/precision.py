"""Which reduced precision a device multiplies natively, for work that needs no exactness.

    dtype = native_low_precision(torch.device("cpu"))   # torch.bfloat16 on AMX / AVX512-BF16 CPUs, else None

Its user: `train.precision: auto` (the default: a run trains under bfloat16 autocast where the device multiplies
bfloat16 natively, in float32 elsewhere; training/precision.py). Where the hardware has bfloat16 matrix
instructions they run faster in bfloat16; elsewhere bfloat16 is emulated and slower than float32, so the answer
there is None (keep float32).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)  # a capability of the machine: asked once per device
def native_low_precision(device: torch.device | str) -> torch.dtype | None:
    """torch.bfloat16 where `device` multiplies bfloat16 matrices in hardware, else None.

    CUDA: compute capability >= 8.0 (Ampere and later: bf16 tensor cores). CPU: Intel AMX tiles (Sapphire
    Rapids and later) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake); their speed against float32 is in
    docs/performance.md §bf16 and fp32 speed. Other CPUs, Apple GPUs (mps) and other devices: None (emulated,
    or not measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0) \
            else None
    if device.type == "cpu":
        # private, so guarded: absent -> not known
        probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        try:
            return torch.bfloat16 if any(probe is not None and probe() for probe in probes) else None
        except RuntimeError:
            return None
    return None
