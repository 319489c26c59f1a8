"""Broyden's memory m (rank-one updates kept) against steps to tolerance, on problems that need many steps.

    python benchmarks/broyden_memory.py                     # the table quoted in deq/solvers.py
    python benchmarks/broyden_memory.py --memories 8 32 all --problems tanh

For each problem and m, `deq.solve` runs Broyden(memory=m) from z0 = 0 until the largest per-sample
relative residual is below the problem's tolerance or `max_steps` steps have run. "all" keeps every update
(m = max_steps), as torchdeq's Broyden does. Printed per (problem, m): steps to tolerance ("-" if not
reached), the final largest residual, the median wall time of --repeats solves, and the memory the updates
occupy at m (2 m [B, D] tensors; the iterate itself and f's own memory come on top).

Problems (batch in dim 0, solved per sample):
    linear-sym    f(z) = A z + x, A symmetric, eigenvalues 0.5 .. 0.995, D = 256, float64.
    linear-rot    f(z) = 0.98 R z + x, R a random orthogonal matrix (eigenvalues on a circle), D = 256, float64.
    tanh          f(z) = tanh(W z + x), ||W|| ~ 2.5 (Picard does not converge), D = 128, float64.
    tanh-hard     the same with ||W|| ~ 4.
    block-fwd     the RevDEQ transformer block (revdeq_cli/model/block.py) as f, one sample per position as the
                  model solves Broyden ([B*T, H] states), width 64, 4 heads, batch 2 x 32 tokens, float32.
    block-bwd     ImplicitAdjoint's backward solve on the same block: u = J^T u + g at the block-fwd point
                  (the model's use of Broyden), float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from revdeq_cli import deq  # noqa: E402
from revdeq_cli.deq.adjoints import _BackwardProblem, iterate  # noqa: E402
from revdeq_cli.deq.problem import AutocastState, Problem  # noqa: E402
from revdeq_cli.deq.state import StateSpec  # noqa: E402
from revdeq_cli.model.block import AttentionMask, Block  # noqa: E402


@dataclass
class Case:
    """One fixed-point problem: `run(m)` solves it with Broyden(memory=m) -> (steps, final max residual, nfe)."""

    name: str
    tol: float
    max_steps: int
    batch: int
    dim: int
    dtype: torch.dtype
    run: Callable[[int], tuple[int, float]]


def _solve_case(name: str, f, x: torch.Tensor, tol: float, max_steps: int) -> Case:
    def run(m: int) -> tuple[int, float]:
        with torch.no_grad():
            sol = deq.solve(f, torch.zeros_like(x), x, solver=deq.Broyden(memory=m), tol=tol, max_steps=max_steps)
        return sol.steps, sol.max_residual

    return Case(name, tol, max_steps, x.shape[0], x[0].numel(), x.dtype, run)


def linear_sym(seed: int, max_steps: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 0.995, 256, dtype=torch.float64)) @ q.T
    x = torch.randn(4, 256, generator=g, dtype=torch.float64)
    return _solve_case("linear-sym", lambda z, x_: z @ a.T + x_, x, 1e-6, max_steps)


def linear_rot(seed: int, max_steps: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    r, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    x = torch.randn(4, 256, generator=g, dtype=torch.float64)
    return _solve_case("linear-rot", lambda z, x_: 0.98 * (z @ r.T) + x_, x, 1e-6, max_steps)


def _tanh(name: str, norm: float) -> Callable[[int, int], Case]:
    def make(seed: int, max_steps: int) -> Case:
        g = torch.Generator().manual_seed(seed)
        w = norm / 2 * torch.randn(128, 128, generator=g, dtype=torch.float64) / 128**0.5  # ||randn/sqrt(n)|| ~ 2
        x = torch.randn(4, 128, generator=g, dtype=torch.float64)
        return _solve_case(name, lambda z, x_: torch.tanh(z @ w.T + x_), x, 1e-6, max_steps)

    return make


def _block(seed: int) -> tuple[Block, torch.Tensor, Callable]:
    torch.manual_seed(seed)
    block = Block(64, 4, 256).eval()
    for p in block.parameters():
        p.requires_grad_(False)
    x = 0.5 * torch.randn(2, 32, 64)
    shape = x.shape

    def f(z: torch.Tensor, x_: torch.Tensor) -> torch.Tensor:  # one sample per position, as the model does
        return block(z.view(shape), x_.view(shape), AttentionMask()).reshape(-1, shape[-1])

    return block, x.reshape(-1, 64), f


def block_fwd(seed: int, max_steps: int) -> Case:
    _, x, f = _block(seed)
    return _solve_case("block-fwd", f, x, 1e-4, max_steps)


def block_bwd(seed: int, max_steps: int) -> Case:
    block, x, f = _block(seed)
    with torch.no_grad():  # the point the backward solve linearises at: a forward solve as tight as it gets
        z_star = deq.solve(f, torch.zeros_like(x), x, solver=deq.Broyden(memory=max_steps), tol=1e-5,
                           max_steps=max_steps).z
    z = z_star.detach().requires_grad_(True)
    fz = f(z, x)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    problem = Problem(f=f, x=x, spec=StateSpec.of(x), state_dtype=x.dtype, autocast=AutocastState.capture("cpu"))

    def run(m: int) -> tuple[int, float]:
        linear = _BackwardProblem(fz=fz, z=z, g=g, problem=problem)
        it = iterate(deq.Broyden(memory=m), linear, g, 1e-5, max_steps)  # type: ignore[arg-type]
        return it.steps, float(it.residual.max())

    return Case("block-bwd", 1e-5, max_steps, x.shape[0], x.shape[1], x.dtype, run)


PROBLEMS = {"linear-sym": linear_sym, "linear-rot": linear_rot, "tanh": _tanh("tanh", 2.5),
            "tanh-hard": _tanh("tanh-hard", 4.0), "block-fwd": block_fwd, "block-bwd": block_bwd}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", nargs="+", default=["4", "8", "16", "32", "64", "all"])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cpu = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# broyden_memory: Broyden(memory=m) steps to tolerance, max {args.max_steps} steps; CPU, {cpu}")
    print(f"{'problem':<11} {'tol':>7} {'m':>4} {'steps':>6} {'final res':>10} {'time ms':>8} {'update MiB':>10}",
          flush=True)
    for name in args.problems:
        case = PROBLEMS[name](args.seed, args.max_steps)
        for mem in args.memories:
            m = args.max_steps if mem == "all" else int(mem)
            times, result = [], (0, 0.0)
            try:
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = case.run(m)
                    times.append(time.perf_counter() - start)
            except deq.SolverDivergedError as err:  # unit steps, no line search: a short memory can blow up
                print(f"{name:<11} {case.tol:>7.0e} {mem:>4} {'-':>6} {'diverged':>10}  (step {err.step})",
                      flush=True)
                continue
            steps, res = result
            reached = str(steps) if res < case.tol else "-"
            mib = 2 * min(m, steps) * case.batch * case.dim * torch.finfo(case.dtype).bits / 8 / 2**20
            print(f"{name:<11} {case.tol:>7.0e} {mem:>4} {reached:>6} {res:>10.2e} "
                  f"{1000 * statistics.median(times):>8.1f} {mib:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
