"""`torch.compile` of the equilibrium function f (the model's block, or each block of the explicit model).

    compiled = compile_blocks(model, device_type="cpu", warn=print_one_line)   # True if compiled

Only the block's own computation is compiled: every caller keeps calling `block(z, x, mask, kv)`, so every
gradient method works unchanged (Unrolled differentiates through the compiled graph; ReversibleAdjoint
re-evaluates f with a graph in its backward pass, which runs the compiled forward and its compiled backward;
Implicit and Phantom take VJPs of it, Implicit repeatedly with retain_graph, so buffer donation is off), as
do DDP (parameters and their hooks are the module's own) and bf16/fp16 autocast (dynamo guards on the
autocast state and traces it). State-dict names do not change (the block is not wrapped, its `forward` is
replaced on the instance), so checkpoints are the same.

Calls with a key/value hook (cached generation: the cache grows by one position per token and the hook writes
into it) run eagerly: there per-call overhead dominates, and shapes that change every token would recompile.

If compilation is unavailable (dynamo unsupported on this Python, no C++ compiler for the CPU backend, no
Triton for CUDA) or fails at the first call, `warn` gets one line and the blocks run eagerly; a failure while
compiling the backward graph (compiled lazily, at the first backward) cannot be recovered that way and raises.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

_ORIGINAL = "_revdeq_eager_forward"


class CompileWarning(UserWarning):
    """torch.compile was asked for but is unavailable or failed: the model runs eagerly."""


def _default_warn(message: str) -> None:
    warnings.warn(message, CompileWarning, stacklevel=3)


def compile_unavailable_reason(device_type: str) -> str | None:
    """Why `torch.compile` cannot work here for `device_type` ("cpu", "cuda", ...), or None if it should."""
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as err:  # noqa: BLE001 - any import or runtime error means "unavailable"
        return f"torch.compile is unavailable ({type(err).__name__}: {err})"
    if device_type == "cpu":
        candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in candidates):
            return "no C++ compiler found (set CXX or install g++), which torch.compile needs on CPU"
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed, which torch.compile needs on CUDA"
    elif device_type != "mps":
        return f"torch.compile is not supported on device type {device_type!r} here"
    return None


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The block(s) f of a `RevDEQForCausalLM` (unwrapped from DDP if wrapped)."""
    model = getattr(model, "module", model)
    return list(model.blocks)


def is_compiled(model: nn.Module) -> bool:
    """True while `compile_blocks` has replaced the blocks' forward."""
    return any(_ORIGINAL in vars(block) for block in blocks_of(model))


def compile_blocks(model: nn.Module, device_type: str, warn: Callable[[str], None] | None = None,
                   **compile_options: Any) -> bool:
    """Compile every block's forward in place (see the module docstring); True if compiled. Otherwise, or if
    the first compiled call fails, `warn` (default: a `CompileWarning`) gets one line and the model runs
    eagerly. `compile_options` go to `torch.compile` (e.g. `mode="max-autotune"`)."""
    import torch

    warn = warn or _default_warn
    reason = compile_unavailable_reason(device_type)
    if reason is not None:
        warn(f"--compile: {reason}; running eagerly")
        return False
    allow_retained_graphs()
    blocks = blocks_of(model)
    state = {"failed": False}

    def fall_back(err: BaseException) -> None:
        if not state["failed"]:
            state["failed"] = True
            first = (str(err).strip().splitlines() or [""])[0][:160]
            warn(f"--compile: torch.compile failed ({type(err).__name__}: {first}); running eagerly")
        for block in blocks:
            uncompile_block(block)

    for block in blocks:
        if _ORIGINAL in vars(block):
            continue
        eager = block.forward
        compiled = torch.compile(eager, **compile_options)

        def forward(z: Any, x: Any = None, mask: Any = None, kv: Any = None, *, _eager: Any = eager,
                    _compiled: Any = compiled) -> Any:
            kwargs = {} if mask is None else {"mask": mask}
            if kv is not None or state["failed"]:
                return _eager(z, x, kv=kv, **kwargs)
            try:
                return _compiled(z, x, **kwargs)
            except Exception as err:  # noqa: BLE001 - a compiler error of any kind: run this call eagerly
                out = _eager(z, x, **kwargs)  # a genuine error in f raises here, as it would without --compile
                fall_back(err)
                return out

        setattr(block, _ORIGINAL, eager)
        block.forward = forward
    return True


def allow_retained_graphs() -> None:
    """AOTAutograd may donate the saved buffers of a compiled backward, which then refuses `retain_graph=True`.
    ImplicitAdjoint's backward solve takes repeated VJPs of one graph (retain_graph=True), and the backward is
    compiled lazily, at the first backward, outside any call we could wrap: so donation is turned off for the
    process (`torch._functorch.config.donated_buffer = False`; it only saves some memory in the backward)."""
    try:
        from torch._functorch import config
    except ImportError:  # pragma: no cover - torch without functorch config
        return
    if hasattr(config, "donated_buffer"):
        config.donated_buffer = False


def uncompile_block(block: nn.Module) -> None:
    """Restore a block's eager forward (no-op if it was not compiled)."""
    if _ORIGINAL in vars(block):
        delattr(block, _ORIGINAL)
        vars(block).pop("forward", None)


def uncompile_blocks(model: nn.Module) -> None:
    """Restore every block's eager forward."""
    for block in blocks_of(model):
        uncompile_block(block)
