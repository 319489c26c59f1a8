"""Shared set-up for the solver benchmarks: the transformer block of the RevDEQ language model used as a
bare fixed-point function f(z, x), one forward+backward through `deq.solve` per gradient method, and a language
model with the training objective of a recipe (`recipe_training`)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

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


def recipe_training(preset: str, recipe: str = "equilibrium", *, seed: int = 0, config_fields: dict | None = None,
                    **objective_fields):
    """(model in training mode, its `TrainingObjective`) of `preset` under `recipe` (`revdeq_cli.recipes`): the
    recipe's model and solver settings plus `config_fields`, and its objective settings with `objective_fields`
    (e.g. detached_steps="6", next_iterate_loss=0.0) put over them. One step:
    `objective(model, inputs, targets, step=0, total_steps=None).loss.backward()` (no ramp)."""
    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
    from revdeq_cli.recipes import model_overrides, recipe_values
    from revdeq_cli.settings import ObjectiveSettings
    from revdeq_cli.training.objective import TrainingObjective

    config = RevDEQConfig.from_preset(preset, **{**model_overrides(recipe, preset), **(config_fields or {})})
    values = {key.split(".", 1)[1]: value for key, value in recipe_values(recipe, preset).items()
              if key.startswith("objective.")}
    objective = TrainingObjective(ObjectiveSettings(**{**values, **objective_fields}), config, seed=seed)
    return RevDEQForCausalLM(config).train(), objective


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def host() -> str:
    """The machine line of a CPU table: cores, CPU model, torch and Python versions."""
    return f"{os.cpu_count()}-core {cpu_model()}, torch {torch.__version__}, Python {platform.python_version()}"
