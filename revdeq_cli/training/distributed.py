"""Process-group setup for `torchrun --nproc_per_node N -m revdeq_cli train ...` and device choice.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; with them present we join the group
(NCCL when training on CUDA, gloo otherwise); without them this is a single process and nothing is set up.
Rank 0 logs and saves; every rank trains on its own shard of the data (see `data_order`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from revdeq_cli.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda (this process's local rank) if available, else mps, else cpu; names are checked."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {spec} requested but CUDA is not available; use --device cpu or auto")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device: mps requested but not available; use --device cpu or auto")
    return torch.device(spec)


def init_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if launched by torchrun; return (DistInfo, this process's device)."""
    if not launched_by_torchrun():
        return DistInfo(), resolve_device(device_spec)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_spec, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                device_id=device if device.type == "cuda" else None)
    return info, device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # Give gloo's worker threads the GIL to let go of the last collective's tensors first: a process group
        # destroyed (here, or later with DDP's reducer) while one of them waits for the GIL deadlocks in the
        # join. Seen when every rank stops on SIGTERM right after the step boundary's all-reduce.
        time.sleep(0.2)
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run directory name, chosen once)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over ranks (in place; returns it)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
