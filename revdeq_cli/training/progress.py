"""What a training run shows while it runs: a rich live display on a terminal, plain lines elsewhere.

Both displays take the same `StepStats` once per optimiser step. The plain display prints one line every
`log_every` steps (and on the first and last step), so CI logs and files stay readable; the rich display
redraws one status line with a progress bar and ETA. Only rank 0 shows anything (`NullProgress` elsewhere).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, Protocol

from revdeq_cli.formatting import format_bytes
from revdeq_cli.training.metrics import perplexity


@dataclass
class StepStats:
    """One optimiser step, as shown and logged. Solver figures are from the step's last micro-batch."""

    step: int  # 1-based: steps completed
    total_steps: int
    loss: float  # mean training loss over the step's micro-batches (and ranks), nats/token
    lr: float
    grad_norm: float  # global norm before clipping
    tokens_per_sec: float  # over the steps since the previous report, all ranks together
    solver_steps: int  # forward solver steps taken
    solver_residual: float  # final relative residual of the forward solve (largest sample)
    backward_nfe: int  # function evaluations of the backward pass (0 when not reported)
    reconstruction_error: float  # reversible backward: max |z0 rebuilt - z0| (nan for other gradients)
    memory_bytes: int  # peak CUDA allocation of this step, or process RSS after the step on CPU (metrics)
    tokens_seen: int
    elapsed: float  # seconds of training in this process
    eta: float  # seconds, estimated from the recent step time

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def describe_step(s: StepStats) -> str:
    """One line with every figure of a step (used by both displays)."""
    return (f"loss {s.loss:.4f} | ppl {s.ppl:.2f} | lr {s.lr:.2e} | tok/s {s.tokens_per_sec:,.0f} | "
            f"solver {s.solver_steps} steps res {s.solver_residual:.1e} | bwd nfe {s.backward_nfe} | "
            f"mem {format_bytes(s.memory_bytes)}")


class Progress(Protocol):
    def start(self, total_steps: int, done_steps: int) -> None: ...
    def update(self, stats: StepStats) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    """Shows nothing (ranks other than 0)."""

    def start(self, total_steps: int, done_steps: int) -> None: ...
    def update(self, stats: StepStats) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """One line per `log_every` steps on `stream` (default stdout), flushed at once."""

    def __init__(self, log_every: int, stream: IO[str] | None = None) -> None:
        self.log_every = log_every
        self.stream = stream or sys.stdout
        self._first = True

    def start(self, total_steps: int, done_steps: int) -> None:
        self._first = True

    def update(self, s: StepStats) -> None:
        if self._first or s.step % self.log_every == 0 or s.step == s.total_steps:
            width = len(str(s.total_steps))
            self.log(f"step {s.step:>{width}}/{s.total_steps} | {describe_step(s)} | eta {format_duration(s.eta)}")
            self._first = False

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None: ...


class RichProgress:
    """A live bar (step, ETA) with the step's figures on the line(s) below; `log` prints above them."""

    def __init__(self, console=None) -> None:  # rich.console.Console | None
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        self.console = console or Console()
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
        )
        self._figures = Text("")
        self._live = Live(Group(self._progress, self._figures), console=self.console, refresh_per_second=4)
        self._task = None

    def start(self, total_steps: int, done_steps: int) -> None:
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps)
        self._live.start()

    def update(self, s: StepStats) -> None:
        self._progress.update(self._task, completed=s.step)
        self._figures.plain = describe_step(s)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        self._live.stop()


def make_progress(mode: str, *, log_every: int, is_main: bool = True) -> Progress:
    """`auto` picks rich on an interactive terminal and plain lines otherwise."""
    if not is_main:
        return NullProgress()
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    return RichProgress() if mode == "rich" else PlainProgress(log_every)


class Throughput:
    """Tokens/s and step time over a sliding window of recent steps (for the display and the ETA)."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._marks: list[tuple[float, int]] = []

    def mark(self, tokens_seen: int) -> None:
        self._marks.append((time.perf_counter(), tokens_seen))
        del self._marks[: -self.window - 1]

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (validation, checkpointing) out of the rate: shift the recorded marks forward."""
        self._marks = [(t + seconds, n) for t, n in self._marks]

    def tokens_per_sec(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def seconds_per_step(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        return (self._marks[-1][0] - self._marks[0][0]) / (len(self._marks) - 1)
