"""Process memory of a default `revdeq train` run, step by step, with the C allocator's view beside it.

    python benchmarks/train_memory.py --steps 300            # the default run's settings, one torch thread
    python benchmarks/train_memory.py --steps 300 --set solver.max_steps=4

Every --every steps it prints the process's resident set size (RSS) and glibc's `mallinfo2`: the heap size,
the part of it in use and the part freed but kept. A run whose in-use heap stays flat holds nothing from
step to step; a growing RSS with a flat in-use heap is the allocator keeping freed memory. Linux/glibc only.
Validation and checkpoints are off (they are not what is measured). Prints a table; exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--set", action="append", default=[], help="extra settings, as `revdeq train --set`")
    args = p.parse_args(argv)

    import psutil
    import torch

    from revdeq_cli.settings import resolve_settings
    from revdeq_cli.training import loop
    from revdeq_cli.training.callbacks import Callback
    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.progress import NullProgress

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    process = psutil.Process()
    mib = 2**20
    print(f"revdeq train, default settings{' + ' + ' '.join(args.set) if args.set else ''}, {args.steps} steps, "
          "one torch thread, CPU")
    print("| step | RSS MiB | heap MiB | in use MiB | freed, kept MiB |")
    print("|---:|---:|---:|---:|---:|")

    class Record(Callback):
        def on_step(self, trainer, record) -> None:  # noqa: ANN001
            step = int(record["step"])
            if step == 1 or step % args.every == 0:
                info = libc.mallinfo2()
                print(f"| {step} | {process.memory_info().rss / mib:.0f} | {info.arena / mib:.0f} | "
                      f"{info.uordblks / mib:.0f} | {info.fordblks / mib:.0f} |", flush=True)

    with tempfile.TemporaryDirectory() as out:
        sets = ["log.progress=plain", "log.tensorboard=false", "train.device=cpu", f"train.max_steps={args.steps}",
                "train.eval_every=0", "train.save_every=0", f"train.out_dir={os.path.join(out, 'run')}", *args.set]
        settings = resolve_settings(sets=sets, environ={})
        # the run's final validation, test and checkpoint follow the last row; they are not what is measured
        loop.Trainer(settings, info=DistInfo(), device=torch.device("cpu"), progress=NullProgress(),
                     callbacks=[Record()]).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
