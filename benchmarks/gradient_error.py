"""How far each gradient method is from the exact gradient of the iteration actually run.

    python benchmarks/gradient_error.py                 # CPU: batch 8, length 128, width 128

f is the RevDEQ language model's transformer block in float32 (random initialisation); the solver is
Reversible (float64 states) run for exactly N steps, for each --betas value. The reference is
UnrolledAdjoint (autograd through every step). For each other method the table gives the relative
error ||g - g_ref|| / ||g_ref|| of the parameter gradient (all parameters concatenated) and of the
input-injection gradient dL/dx, plus the forward residual reached.
Reversible is exact up to rounding (at beta = 0.5 the float64 reversal of float32 values is often exact to
the bit, so its error prints as 0); Implicit and Phantom are approximations whose error depends on how
well the forward converged, which an untrained block does not in a few steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deq_bench import add_block_args, forward_backward, machine, make_problem  # noqa: E402


def gradients(args: argparse.Namespace, method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    block, x, cotangent = make_problem(args)
    sol = forward_backward(block, x, cotangent, method, steps, args.beta)
    params = torch.cat([p.grad.double().flatten() for p in block.parameters()])
    return params, x.grad.double().flatten(), sol.max_residual


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_block_args(parser)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.8])
    args = parser.parse_args()

    print(f"# gradient_error: batch {args.batch}, length {args.length}, width {args.width}, {args.heads} heads; "
          f"f in float32, Reversible solver with float64 states; reference UnrolledAdjoint; {machine(args.device)}")
    print(f"{'beta':>4} {'steps':>5}  {'residual':>9}  {'method':<10} {'rel err params':>15} {'rel err x':>10}")
    for beta in args.betas:
        args.beta = beta
        for steps in args.steps:
            ref_p, ref_x, residual = gradients(args, "unrolled", steps)
            for method in ("reversible", "implicit", "phantom"):
                p, x, _ = gradients(args, method, steps)
                err_p = float((p - ref_p).norm() / ref_p.norm())
                err_x = float((x - ref_x).norm() / ref_x.norm())
                print(f"{beta:>4} {steps:>5}  {residual:>9.2e}  {method:<10} {err_p:>15.2e} {err_x:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
