"""What to tell the user when training diverges: each remedy phrased as the flag to pass and the value now.

    divergence_remedies(settings, is_deq=True)   # forward divergence (the loss or the solve)
    backward_divergence_remedies(settings)       # the implicit gradient's backward solve
    join_or(["a", "b", "c"])                     # "a, b or c"
    diverged_error(settings, step, "the loss", nan, saved=(200, path), is_deq=True)   # -> TrainingDivergedError
"""

from __future__ import annotations

from pathlib import Path

from revdeq_cli.errors import UserError
from revdeq_cli.settings import Settings
from revdeq_cli.solver_facts import BETA_SOLVERS  # the solvers whose step uses solver.beta


def divergence_remedies(s: Settings, *, is_deq: bool) -> list[str]:
    """What might stop a diverging run, each phrased as the flag to pass and the value now: only changes
    that would change something for this run (no beta advice for a solver without one, no float64 advice
    when the states already are float64, a tighter clip when clipping is already on)."""
    tr, sv = s.train, s.solver
    out = [f"a lower learning rate (--lr {tr.lr / 2:g}, now {tr.lr:g})"]
    if is_deq and sv.solver in BETA_SOLVERS and sv.beta is not None:
        out.append(f"a smaller beta (--beta {sv.beta / 2:g}, now {sv.beta:g})")
    if is_deq and sv.state_dtype != "float64":
        out.append(f"float64 solver states (--set solver.state_dtype=float64, now {sv.state_dtype})")
    if tr.grad_clip == 0:
        out.append("gradient clipping (--set train.grad_clip=1.0, now off)")
    else:
        out.append(f"tighter gradient clipping (--set train.grad_clip={tr.grad_clip / 2:g}, now {tr.grad_clip:g})")
    if tr.precision == "fp16":
        out.append("a wider number format (--precision bf16 or fp32, now fp16)")
    elif tr.precision == "bf16":  # `auto` picks bf16 on bf16 hardware: its 8-bit significand may be what diverged
        out.append("float32 matrix products (--precision fp32, now bf16)")
    return out


def backward_divergence_remedies(s: Settings) -> list[str]:
    """What might stop the implicit gradient's backward solve from diverging (its own settings, not the
    forward solver's beta): fewer backward steps, a looser tolerance, a lower learning rate, another gradient."""
    tr, sv = s.train, s.solver
    steps = sv.implicit_max_steps or 20
    out = [f"fewer backward solver steps (--set solver.implicit_max_steps={max(1, steps // 2)}, now {steps})"]
    if sv.implicit_tol is not None:
        out.append(f"a looser backward tolerance (--set solver.implicit_tol={sv.implicit_tol * 10:g}, "
                   f"now {sv.implicit_tol:g})")
    out.append(f"a lower learning rate (--lr {tr.lr / 2:g}, now {tr.lr:g})")
    out.append("the phantom gradient (--adjoint phantom), which needs no backward solve")
    return out


def join_or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


class TrainingDivergedError(UserError):
    """The loss, gradient norm or solver residual became NaN/inf; the message names the step and remedies."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def diverged_error(s: Settings, step: int, what: str, value: float, *, saved: tuple[int, Path] | None,
                   is_deq: bool, backward: bool = False) -> TrainingDivergedError:
    """The error for `what` (e.g. "the loss") becoming `value` at optimiser step `step`, naming the last saved
    checkpoint `saved` ((step, path) or None) and the remedies for a forward or a `backward` divergence."""
    kept = (f"the last good checkpoint is {saved[1]} (step {saved[0]})" if saved is not None
            else "no checkpoint had been saved yet")
    remedies = backward_divergence_remedies(s) if backward else divergence_remedies(s, is_deq=is_deq)
    return TrainingDivergedError(f"training diverged at step {step}: {what} is {value}; {kept}. Try "
                                 + join_or(remedies), step=step)
