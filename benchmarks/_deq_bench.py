"""Shared set-up for the solver benchmarks: the transformer block of the RevDEQ language model used as a
bare fixed-point function f(z, x), and one forward+backward through `deq.solve` per gradient method."""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from revdeq_cli import deq
from revdeq_cli.model.block import Block

METHODS: dict[str, Callable[[], deq.Adjoint]] = {
    "unrolled": deq.UnrolledAdjoint,
    "reversible": deq.ReversibleAdjoint,
    "implicit": lambda: deq.ImplicitAdjoint(tol=1e-4, max_steps=30),
    "phantom": lambda: deq.PhantomAdjoint(steps=1),
}


def add_block_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)


def make_problem(args: argparse.Namespace, dtype: torch.dtype = torch.float32):
    """(block f, input injection x, cotangent for z*): f in `dtype`, x with requires_grad."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    block = Block(args.width, args.heads, 4 * args.width).to(device=device, dtype=dtype)
    x = (0.5 * torch.randn(args.batch, args.length, args.width, device=device, dtype=dtype)).requires_grad_()
    cotangent = torch.randn(args.batch, args.length, args.width, device=device, dtype=dtype)
    return block, x, cotangent


def forward_backward(block, x, cotangent, method: str, steps: int, beta: float, tol: float | None = None):
    """One forward+backward with the Reversible solver (float64 states) and the given gradient method.
    Returns the Solution; gradients land in block's parameters and x.grad."""
    sol = deq.solve(block, torch.zeros_like(x), x, solver=deq.Reversible(beta), adjoint=METHODS[method](),
                    tol=tol, max_steps=steps)
    (sol.z * cotangent).sum().backward()
    return sol


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
