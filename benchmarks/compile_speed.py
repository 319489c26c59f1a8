"""What `--compile` (torch.compile of the block f) gives: a block forward, and training steps per second.

    .venv/bin/python benchmarks/compile_speed.py [--preset tiny] [--batch 8] [--seq 128] [--repeats 30]
                      [--train-steps 10] [--device cpu] [--threads 1]

Part 1: one forward of the block f(z, x) (no autograd, as in the solver's inner loop), eager vs compiled,
best-of-`--repeats` wall time (median also printed) after warm-up; compile time is reported separately.
Part 2: training steps of the whole model (`--preset`, byte vocabulary 260, reversible solver and gradient
as configured in the preset, AdamW) in eager and compiled form after 2 warm-up steps; steps/s from the median
step time; losses of both printed so you can see they agree. The machine line says what it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model.block import AttentionMask
from revdeq_cli.model.compile import compile_blocks, is_compiled


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def block_forward(args: argparse.Namespace, device: torch.device) -> None:
    config = RevDEQConfig.from_preset(args.preset, vocab_size=260)
    eager = RevDEQForCausalLM(config).to(device).eval()
    compiled = RevDEQForCausalLM(config).to(device).eval()
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled, device.type, warn=print)
    z = torch.randn(args.batch, args.seq, config.hidden_size, device=device)
    x = torch.randn_like(z)
    mask = AttentionMask(causal=True)
    rows = []
    for name, model in (("eager", eager), ("compiled", compiled)):
        block = model.blocks[0]
        with torch.no_grad():
            t0 = time.perf_counter()
            block(z, x, mask)
            first = time.perf_counter() - t0
            for _ in range(3):
                block(z, x, mask)
            times = _time(lambda b=block: b(z, x, mask), args.repeats, device)
        rows.append((name, first, min(times), statistics.median(times)))
    with torch.no_grad():
        diff = (eager.blocks[0](z, x, mask) - compiled.blocks[0](z, x, mask)).abs().max().item()
    print(f"\n## Block forward: preset {args.preset} (H={config.hidden_size}), batch {args.batch} x {args.seq} "
          f"positions, no autograd\n")
    print("| mode | first call (s) | best (ms) | median (ms) |\n|---|---|---|---|")
    for name, first, best, median in rows:
        print(f"| {name} | {first:.2f} | {best * 1e3:.3f} | {median * 1e3:.3f} |")
    print(f"\ncompiled / eager, best: {rows[1][2] / rows[0][2]:.3f}; median: {rows[1][3] / rows[0][3]:.3f}; "
          f"max |difference| {diff:.2e}")


def training(args: argparse.Namespace, device: torch.device) -> None:
    config = RevDEQConfig.from_preset(args.preset, vocab_size=260, max_position_embeddings=args.seq)
    print(f"\n## Training steps: preset {args.preset}, solver {config.solver}/{config.adjoint}, {config.max_steps} "
          f"solver steps, batch {args.batch} x {args.seq}\n")
    print("| mode | compile+first step (s) | median step (s) | steps/s | losses |\n|---|---|---|---|---|")
    medians = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = RevDEQForCausalLM(config).to(device).train()
        if compile_:
            assert compile_blocks(model, device.type, warn=print)
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 260, (args.batch, args.seq), generator=generator).to(device)
                   for _ in range(args.train_steps + 2)]
        losses, times = [], []
        for i, ids in enumerate(batches):
            _sync(device)
            t0 = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if i == 0:
                first = times[0]
        assert is_compiled(model) == compile_
        median = statistics.median(times[2:])
        medians.append(median)
        shown = ", ".join(f"{v:.4f}" for v in losses[:3])
        print(f"| {'compiled' if compile_ else 'eager'} | {first:.1f} | {median:.3f} | {1 / median:.2f} | {shown} |")
    print(f"\ncompiled / eager step time: {medians[1] / medians[0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {name}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    block_forward(args, device)
    training(args, device)


if __name__ == "__main__":
    main()
