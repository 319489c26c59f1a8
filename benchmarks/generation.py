"""Generation speed with and without the key/value cache, and what the compact fixed-point cache costs
in perplexity.

    .venv/bin/python benchmarks/generation.py [--preset small] [--vocab-sizes 50304 257] [--batch-sizes 1 4]
                      [--prompt 16] [--new 240] [--repeats 3] [--ppl-train-steps 80] [--device cpu] [--threads 1]

Part 1 (speed): an untrained `--preset` Reversible DEQ (context = prompt + new tokens) generates greedily
with `model.generate`: the exact per-evaluation cache (default), the fixed-point cache, and
`use_cache=False` (the whole sequence is re-solved for every token). All runs do the same
inference_max_steps solver steps per solve. One table per --vocab-sizes entry and --batch-sizes entry: the
presets' GPT-2 vocabulary and the byte tokenizer the command line uses by default, one sequence and a
small batch of equal-length prompts. tokens/s counts new tokens of all sequences; the best of --repeats
interleaved runs is kept, in wall time and in CPU time of this process (on a shared CPU machine the CPU time
is the steadier figure and the speed-up uses it; on a GPU, wall time). It checks that cached and uncached
runs produce the same tokens, and exits 1 unless the exact cache is at least 5x faster than no cache in
every table.

Each table also times the output head alone (ln_f + the V x H head for one position per sequence): every
mode pays it once per generated token, so uncached step time / head time bounds what any cache can
achieve. With the GPT-2 vocabulary and one sequence that head streams a 51 MB float32 matrix per token,
which on a CPU with little memory bandwidth is the larger part of a cached step.

Part 2 (perplexity): a `tiny` byte-level model (the preset's solver, a 192-byte context, the cross-entropy
alone) is trained for --ppl-train-steps on CPython's pydoc topics,
then scores held-out text token by token (teacher forcing) with each cache; the table gives the perplexity
and the largest logit difference from the full forward. The exact cache matches to float rounding; the
fixed-point cache is exact only where the solves converge, so its difference shrinks with more steps.

--threads sets torch's CPU threads (default 1: decoding one sequence is latency-bound, and on a shared
machine multi-threaded kernels stall on busy cores; 0 keeps torch's default).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, prompt, new: int, **kwargs):
    """One greedy generation: (sequences, wall seconds, CPU seconds of this process)."""
    import torch

    synchronize(str(prompt.device))
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    synchronize(str(prompt.device))
    return out, time.perf_counter() - wall, time.process_time() - cpu


def head_seconds(model, batch: int, device: str, repeats: int = 50) -> float:
    """Seconds of `lm_head(ln_f(z))` for one position per sequence: the part of every generated token that no
    cache can save (with the GPT-2 vocabulary it streams a 50304 x H weight matrix per token)."""
    import torch

    z = torch.randn(batch, 1, model.config.hidden_size, device=device)
    best = math.inf
    with torch.no_grad():
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                model.lm_head(model.ln_f(z))
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / repeats)
    return best


def speed_table(args, vocab_size: int, batch: int) -> bool:
    import torch

    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    context = args.prompt + args.new
    torch.manual_seed(0)
    config = RevDEQConfig.from_preset(args.preset, vocab_size=vocab_size, max_position_embeddings=context,
                                      pad_token_id=0)
    model = RevDEQForCausalLM(config).to(args.device).eval()
    prompt = torch.randint(1, config.vocab_size, (batch, args.prompt), device=args.device)
    split = model.num_parameters_split()
    print(f"model: preset {args.preset}, width {config.hidden_size}, {config.num_attention_heads} heads, vocab "
          f"{config.vocab_size}, {split['non_embedding'] / 1e6:.2f}M non-embedding params (head included), "
          f"{config.eval_max_steps} reversible steps = {1 + 2 * config.eval_max_steps} evaluations of f per solve")
    print(f"generation: greedy, batch {batch}, prompt {args.prompt} tokens, {args.new} new tokens per sequence "
          f"(context {context}), best of {args.repeats}, device {args.device}")

    modes = {  # name: (config.cache_mode, generate kwargs)
        "exact KV cache (1 layer per evaluation)": ("exact", {}),
        "fixed-point KV cache (final states)": ("fixed_point", {}),
        "no cache (re-solve the whole sequence)": ("exact", {"use_cache": False}),
    }
    timed_generate(model, prompt, 4)  # warm-up
    best = {name: (math.inf, math.inf) for name in modes}
    sequences = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load on a shared machine hits every mode
        for name, (cache_mode, kwargs) in modes.items():
            model.config.cache_mode = cache_mode
            sequences[name], wall, cpu = timed_generate(model, prompt, args.new, **kwargs)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    model.config.cache_mode = "exact"

    # On a CPU the process's CPU time is the steadier figure on a shared machine; a GPU's work is not in it.
    basis = 1 if args.device == "cpu" else 0
    basis_name = "CPU" if basis else "wall"
    exact, _, full = modes
    tokens = args.new * batch
    print(f"{'mode':<42} {'wall s':>7} {'tokens/s':>9} {'CPU s':>7} {'tokens/CPU s':>13} "
          f"{'speed-up (' + basis_name + ')':>16}")
    for name, times in best.items():
        wall, cpu = times
        print(f"{name:<42} {wall:>7.2f} {tokens / wall:>9.1f} {cpu:>7.2f} {tokens / cpu:>13.1f} "
              f"{best[full][basis] / times[basis]:>15.1f}x")
    same = torch.equal(sequences[exact], sequences[full])
    speedup = best[full][basis] / best[exact][basis]
    head = head_seconds(model, batch, args.device)
    cached_step = best[exact][0] / args.new
    print(f"lm head alone (ln_f + {config.vocab_size} x {config.hidden_size} head, one position per sequence): "
          f"{1e3 * head:.2f} ms per step = {100 * head / cached_step:.0f}% of a cached step (wall); "
          f"no cache could beat {best[full][0] / args.new / head:.1f}x")
    ok = same and speedup >= 5
    print(f"cached and uncached tokens identical: {same}; exact-cache speed-up {speedup:.1f}x in {basis_name} time "
          f"({best[full][0] / best[exact][0]:.1f}x wall; required >= 5x): {'PASS' if ok else 'FAIL'}")
    print()
    return ok


def pydoc_bytes() -> bytes:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode()


def teacher_forced_logits(model, ids, **kwargs):
    """Logits [1, T, V] computed one token at a time through the cache."""
    import torch

    out = model(ids[:, :1], use_cache=True)
    logits = [out.logits]
    for t in range(1, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=out.cache)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def perplexity_table(args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    data = torch.from_numpy(np.frombuffer(pydoc_bytes(), dtype=np.uint8).astype(np.int64))
    train, held_out = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]
    seq_len, batch = 96, 8
    torch.manual_seed(0)
    # the tiny width with a context for the 192-byte windows scored below (the preset's own is 128)
    config = RevDEQConfig.from_preset("tiny", vocab_size=256, max_position_embeddings=192)
    model = RevDEQForCausalLM(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    model.train()
    for _ in range(args.ppl_train_steps):
        starts = torch.randint(0, len(train) - seq_len - 1, (batch,))
        block = torch.stack([train[s : s + seq_len + 1] for s in starts.tolist()]).to(args.device)
        loss = model(block[:, :-1], shift_labels=block[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print(f"model: preset tiny, byte vocabulary, trained {args.ppl_train_steps} steps of {batch}x{seq_len} bytes "
          f"on pydoc topics ({time.perf_counter() - start:.0f} s, last train loss {loss.item():.3f})")
    print("scored: 4 held-out windows of 192 bytes, every position teacher-forced")
    print()
    windows = [held_out[i * 5000 : i * 5000 + 193] for i in range(4)]

    print(f"{'steps':>5} {'mode':<14} {'perplexity':>10} {'max |logit - full|':>19} {'final residual':>15}")
    for steps in (4, 8, 16):
        model.config.inference_max_steps = steps
        for mode in ("full", "exact", "fixed_point"):
            model.config.cache_mode = "exact" if mode == "full" else mode
            nll, diff, residual = 0.0, 0.0, 0.0
            for window in windows:
                ids = window[None, :-1].to(args.device)
                with torch.no_grad():
                    full = model(ids).logits
                    logits = full if mode == "full" else teacher_forced_logits(model, ids)
                residual = max(residual, model.last_solver_stats.residual)
                nll += F.cross_entropy(logits[0].float(), window[1:].to(args.device), reduction="sum").item()
                diff = max(diff, float((logits - full).abs().max()))
            ppl = math.exp(nll / sum(len(w) - 1 for w in windows))
            print(f"{steps:>5} {mode:<14} {ppl:>10.3f} {diff:>19.2e} {residual:>15.3g}")
    model.config.cache_mode = "exact"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[50304, 257],
                        help="one speed table each: 50304 = the presets' GPT-2 vocabulary, 257 = the byte tokenizer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4],
                        help="sequences generated together; one speed table per vocabulary and batch size")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-train-steps", type=int, default=80, help="0 skips the perplexity table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--no-check", action="store_true", help="print the verdict but exit 0 (a smoke run at a "
                        "size where the speed-up target does not apply: benchmarks/gpu.sh --smoke)")
    args = parser.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs "
          f"({torch.get_num_threads()} threads), {platform.machine()}")
    print()
    results = {(vocab, batch): speed_table(args, vocab, batch) for vocab in args.vocab_sizes
               for batch in args.batch_sizes}
    print("summary: exact cache >= 5x faster than no cache: "
          + ", ".join(f"vocab {v} batch {b} {'PASS' if ok else 'FAIL'}" for (v, b), ok in results.items()))
    print()
    ok = all(results.values())
    if args.ppl_train_steps > 0:
        perplexity_table(args)
    return 0 if ok or args.no_check else 1


if __name__ == "__main__":
    raise SystemExit(main())
