"""The number format a run trains in (`train.precision`), and the warning for a format the CPU emulates.

    resolve_precision("auto", torch.device("cpu"))    # "bf16" on AMX / AVX512-BF16 CPUs, else "fp32"

bf16 / fp16 autocast f's and the head's matrix products in training only; the solver keeps its states in
`solver.state_dtype` (float64 by default), so its gradient is exact for the iteration as computed. Validation, `revdeq
eval` and generation run the saved float32 weights in float32, so the validation loss a run reports is the one
`revdeq eval` gives (docs/DESIGN.md §8).
"""

from __future__ import annotations

import torch

from revdeq_cli.deq.precision import native_low_precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` itself, or for "auto" "bf16" where `device` multiplies bfloat16 natively
    (`deq.precision.native_low_precision`: CUDA >= 8.0, AMX, AVX512-BF16) and "fp32" elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if native_low_precision(device) is torch.bfloat16 else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision ("fp32": None, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def emulated_precision_warning(precision: str, device: torch.device) -> str | None:
    """A warning when a run trains under bf16 autocast on a CPU that has no bfloat16 matrix instructions (given
    explicitly, or stored by a run that `auto` started on another machine): there each bfloat16 product is emulated,
    and a training step of the tiny preset took 10x to 14x as long as in float32 on a 2-core AVX2 CPU
    (`benchmarks/results/precision_speed-amd-epyc-avx2.md`). None elsewhere."""
    if precision != "bf16" or device.type != "cpu" or native_low_precision(device) is torch.bfloat16:
        return None
    return ("warning: train.precision bf16 on a CPU without bfloat16 matrix instructions (AMX or AVX512-BF16): "
            "its matrix products are emulated, about 10x slower than fp32; --precision auto (or fp32) trains in "
            "fp32 here")
