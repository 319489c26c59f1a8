"""Stopping a run at a step boundary: Ctrl-C, SIGTERM and SIGUSR1 finish the step, save it and raise
`TrainingStopped` (`revdeq train` exits 128 + the signal); under torchrun every rank stops at the same step.

    stops = StopSignals(log=progress.log)
    with stops.installed():
        for each step:
            stops.check(info, device)     # raises TrainingStopped if any rank got a stop signal
            ...
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from revdeq_cli.training.distributed import DistInfo, all_reduce_sum

# Signals that stop a run at the next step boundary with a checkpoint (Ctrl-C; SIGTERM: what SLURM, Kubernetes and
# torchrun send before SIGKILL; SIGUSR1: what SLURM can send ahead of the time limit, `--signal=USR1@120`).
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                                      if hasattr(signal, name))


class TrainingStopped(KeyboardInterrupt):
    """The run stopped at a step boundary on a stop signal and saved that step; `revdeq train` exits with
    `exit_code`, 128 + the signal number (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1), as a process killed by it would."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(self.name)

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.signum,))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """The stop signals of one run. `installed()` routes them here while the run trains; `check()` asks every
    rank at a step boundary. `log(message)` tells the user (rank 0's progress display), or None on other ranks."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log
        self.received: int | None = None  # the first stop signal received

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The first of Ctrl-C, SIGTERM or SIGUSR1 asks the loop to stop at the next step boundary, so the checkpoint
        it saves is a consistent state and no library is interrupted half-way (e.g. TensorBoard's writer queue). A
        second Ctrl-C interrupts at once; a second SIGTERM / SIGUSR1 changes nothing (a scheduler and torchrun may
        both deliver one). Outside the main thread (where signals cannot be handled) nothing is installed."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.received is not None:
                if signum == signal.SIGINT:
                    raise TrainingStopped(signum)
                return
            self.received = signum
            if self.log is not None:  # a failed write (re-entered stdout) must not turn into an exception here
                with contextlib.suppress(RuntimeError, OSError):
                    self.log(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
                             + (" (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""))

        previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:  # restart the system calls it lands in (e.g. in gloo's threads), do not fail them
            if hasattr(signal, "siginterrupt"):
                signal.siginterrupt(s, False)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def check(self, info: DistInfo, device: torch.device) -> None:
        """Raise `TrainingStopped` at a step boundary if any process got a stop signal. All ranks agree (on the
        step and on the signal: the first of `STOP_SIGNALS` any rank got), so no rank is left waiting in a
        collective and rank 0 saves the one checkpoint."""
        flags = torch.tensor([1.0 if self.received == s else 0.0 for s in STOP_SIGNALS], dtype=torch.float64,
                             device=device)
        if info.world_size > 1:
            flags = all_reduce_sum(flags, info)
        signalled = [s for s, count in zip(STOP_SIGNALS, flags.tolist(), strict=True) if count > 0]
        if signalled:
            raise TrainingStopped(signalled[0])
