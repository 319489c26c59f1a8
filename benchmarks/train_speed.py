"""Training speed and memory per model at one size: each recipe, the unrolled gradient, and an explicit
transformer of the same width with as many layers as the paper's model evaluates its block.

    python benchmarks/train_speed.py --device cuda --preset paper --precision bf16 --steps 50   # a GPU
    python benchmarks/train_speed.py --smoke                        # the same models on the CPU, tiny, a few steps

Models, each trained by `revdeq train`'s Trainer on pydoc (byte tokenizer) in a fresh process, one after another:

    revdeq-paper         --recipe paper: the exact reversible gradient through every step (at most 4)
    revdeq-equilibrium   --recipe equilibrium: a graph-free start, then the differentiated steps
    revdeq-unrolled      --recipe paper with solver.adjoint=unrolled: backprop through the stored iteration
    transformer-12       an explicit GPT, 12 untied layers of the same width (the paper recipe's optimiser)

Figures per model: tokens/s over the steps after the first `--warmup` (synchronised on CUDA), block evaluations
per training step (forward and backward, DEQs), and peak memory of the training steps: on CUDA the largest
`max_memory_allocated` of a step (the Trainer resets it every step), on CPU the increase of the process's peak
RSS over what it held before the first step. Prints one Markdown table naming the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revdeq_cli.training.callbacks import Callback  # noqa: E402

MODELS: dict[str, list[str]] = {
    "revdeq-paper": ["train.recipe=paper"],
    "revdeq-equilibrium": ["train.recipe=equilibrium"],
    "revdeq-unrolled": ["train.recipe=paper", "solver.adjoint=unrolled"],
    "transformer-12": ["train.recipe=paper", "solver.solver=explicit", "solver.adjoint=null",
                       "model.num_hidden_layers=12"],
}


class StepClock(Callback):
    """Times each optimiser step (CUDA synchronised) and keeps the solver figures of its record."""

    def __init__(self, device) -> None:
        self.device, self.times, self.records = device, [], []
        self.rss_before = 0

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_start(self, trainer) -> None:
        self.rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.times.append(self._now())

    def on_step(self, trainer, record) -> None:
        self.times.append(self._now())
        self.records.append(record)


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Train model `name` for `args.steps` steps in this process; its figures."""
    import torch

    from revdeq_cli.settings import resolve_settings
    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.loop import Trainer
    from revdeq_cli.training.progress import NullProgress

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="revdeq-speed-") as tmp:
        sets = [*MODELS[name], f"model.preset={args.preset}", f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch_size}", f"train.precision={args.precision}",
                f"train.device={args.device}", "train.eval_every=0", "train.save_every=0", "train.eval_batches=1",
                "log.tensorboard=false", "data.offline=true", f"train.out_dir={tmp}/run"]
        if args.width:
            sets += [f"model.hidden_size={args.width}", f"model.intermediate_size={4 * args.width}",
                     f"model.num_attention_heads={args.heads}"]
        if args.seq_len:
            sets.append(f"data.seq_len={args.seq_len}")
        settings = resolve_settings(sets=sets, environ={})
        clock = StepClock(device)
        trainer = Trainer(settings, info=DistInfo(), device=device, progress=NullProgress(), callbacks=[clock])
        summary = trainer.run()
    timed = clock.times[args.warmup:]
    seconds = timed[-1] - timed[0]
    steady = clock.records[args.warmup:]
    peak = (summary.peak_memory_bytes if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - clock.rss_before)
    is_deq = trainer.model.config.is_deq
    return {
        "model": name, "params": trainer.model.num_parameters_split()["non_embedding"],
        "tokens_per_sec": trainer.tokens_per_step * len(steady) / seconds if seconds > 0 else float("nan"),
        "fwd_steps": sum(r["solver_steps"] for r in steady) / len(steady) if is_deq else None,
        "bwd_nfe": sum(r["backward_nfe"] for r in steady) / len(steady) if is_deq else None,
        "layers": None if is_deq else trainer.model.config.num_hidden_layers,
        "peak_mib": peak / 2**20, "tokens_per_step": trainer.tokens_per_step, "steps": len(clock.records),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="paper")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (allocator, kernels)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's context")
    p.add_argument("--width", type=int, default=None, help="override the preset's width (heads: --heads)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny width 32, fp32, 4 steps of 4 x 32 tokens")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.device, args.preset, args.precision, args.steps, args.warmup = "cpu", "tiny", "fp32", 4, 1
        args.batch_size, args.seq_len, args.width, args.heads, args.threads = 4, 32, 32, 2, 1
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    forwarded = [a for a in sys.argv[1:] if a != "--smoke"] + (
        ["--device", "cpu", "--preset", "tiny", "--precision", "fp32", "--steps", "4", "--warmup", "1",
         "--batch-size", "4", "--seq-len", "32", "--width", "32", "--heads", "2", "--threads", "1"]
        if args.smoke else [])
    rows = []
    for name in args.models:  # a fresh process each: one model's peak memory cannot hide another's
        out = subprocess.run([sys.executable, __file__, *forwarded, "--one", name], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """The Markdown table of `rows`, headed by the machine and the settings."""
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (
        platform.processor() or platform.machine())
    memory = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS increase"
    lines = [f"device {args.device} ({device}), torch {torch.__version__}; preset {args.preset}"
             + (f" at width {args.width}" if args.width else "") + f", {args.precision}, batch {args.batch_size}, "
             f"{rows[0]['tokens_per_step']:,} tokens/step, {args.steps} steps ({args.warmup} untimed)", "",
             f"| model | non-emb. params | tokens/s | block evals fwd / bwd per step | {memory} MiB |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["fwd_steps"] is None:
            evals = f"{r['layers']} / {r['layers']} (layers)"
        else:  # the unrolled gradient's backward is autograd's through every stored evaluation
            evals = f"{1 + 2 * r['fwd_steps']:.1f} / " + (f"{r['bwd_nfe']:.1f}" if r["bwd_nfe"] else "autograd")
        lines.append(f"| {r['model']} | {r['params']:,} | {r['tokens_per_sec']:,.0f} | {evals} "
                     f"| {r['peak_mib']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
