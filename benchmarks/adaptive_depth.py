"""Adaptive depth against fixed solver steps: block evaluations per token, perplexity, generation speed.

    .venv/bin/python benchmarks/adaptive_depth.py CHECKPOINT [--steps 1 2 4 8 16 32] [--tols 0.3 0.2 0.1]
                      [--max-steps 8 32] [--batches 1 8] [--new 64] [--repeats 3] [--threads 2] [--name adaptive_depth]

CHECKPOINT: a checkpoint or run directory of a RevDEQ language model with its training settings (the
published table used the `final/` of the no-options `revdeq train`). Three parts, all on its validation split:

1. Fixed step counts: validation perplexity (whole split, `training.evaluate.evaluate_split`) at each of
   --steps, every position running that many solver steps.
2. Adaptive depth: the same at each tolerance of --tols and each limit of --max-steps: each position stops
   once its own relative residual is below the tolerance (deq/iteration.py). Block evaluations per token =
   evaluations of f a token's position needed: 1 + e * (its steps), e = 2 for the reversible solver
   (f at y, then at z), 1 otherwise; the mean over the split's tokens.
3. Generation: greedy cached decoding (`model.generate`, exact KV cache) of --new tokens after prompts taken
   from the validation split, batch 1 and each of --batches, for every setting above; tokens/s (new tokens of
   all sequences per wall second, the best of --repeats interleaved runs) and the mean solver steps of the
   decoded tokens. A decoding solve of a batch runs until all its sequences' new tokens have frozen.

Target (issue 21): a tolerance whose perplexity is within 1% of the best any fixed count reaches, with
<= 0.7x the evaluations per token of the cheapest fixed count that does, and >= 1.3x its generation speed.
The verdict line says which tolerance (if any) meets it.

Where the evaluations are not saved: the full-sequence forward (training-style evaluation, part 1-2) runs f
on the whole sequence at every step until the slowest position has frozen, so its wall time does not fall
with the mean; cached decoding of one sequence is where a token's own stop saves work.

Writes benchmarks/results/<name>.md, <name>.json and <name>.png (evaluations per token vs perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def evaluations_per_token(mean_steps: float, per_step: int) -> float:
    """Evaluations of f one position needs: the one at z0, then `per_step` per solver step."""
    return 1 + per_step * mean_steps


def generation_speed(model, prompts, new: int, repeats: int, settings: list[tuple[int, float | None]]):
    """{setting: (tokens/s, mean steps per decoded token)} for greedy cached decoding of `prompts` [B, P]."""
    import torch

    config = model.config
    steps_seen: dict = {s: [] for s in settings}
    best = {s: math.inf for s in settings}

    def record(_module, _args, output):
        if current is not None and output.solver_position_steps is not None:
            steps_seen[current].append(output.solver_position_steps[:, -1].double().mean().item())

    hook = model.register_forward_hook(record)
    current = None
    try:
        with torch.no_grad():
            config.inference_max_steps, config.inference_tol = settings[0]
            model.generate(prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           attention_mask=torch.ones_like(prompts))  # warm-up
            for _ in range(repeats):  # interleaved: a burst of load on a shared machine hits every setting
                for setting in settings:
                    config.inference_max_steps, config.inference_tol = setting
                    steps_seen[setting].clear()
                    current = setting
                    start = time.perf_counter()
                    model.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   attention_mask=torch.ones_like(prompts))
                    best[setting] = min(best[setting], time.perf_counter() - start)
                    current = None
    finally:
        hook.remove()
    tokens = new * prompts.shape[0]
    # the prefill's last position is counted among the decoded tokens' steps: it picks the first new token
    return {s: (tokens / best[s], sum(steps_seen[s]) / max(len(steps_seen[s]), 1)) for s in settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--tols", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05])
    parser.add_argument("--max-steps", type=int, nargs="+", default=[8, 32],
                        help="the most steps a position takes under --tols (each limit with each tolerance)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-batches", type=int, default=None, help="score only this many batches (quick runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="adaptive_depth")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    import torch

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus
    from revdeq_cli.solver_facts import SOLVER_FACTS
    from revdeq_cli.training.evaluate import evaluate_split

    torch.set_num_threads(args.threads)
    model, tokenizer, settings, meta = load_checkpoint(args.checkpoint)
    config = model.config
    if not config.is_deq:
        raise SystemExit(f"{args.checkpoint}: an explicit model has no solver steps to adapt")
    data = settings.data
    corpus = prepare_corpus(data.dataset, dataset_config=data.dataset_config, tokenizer=str(meta["path"]),
                            offline=True, cache_dir=data.cache_dir)
    tokens = corpus.splits["validation"]
    seq_len = min(data.seq_len, config.max_position_embeddings)
    per_step = SOLVER_FACTS[config.solver].evaluations_per_step
    own = (config.inference_max_steps, config.inference_tol)

    def score(steps: int, tol: float | None) -> dict:
        result = evaluate_split(model, tokens, split_bytes=corpus.split_bytes["validation"], seq_len=seq_len,
                                batch_size=args.eval_batch_size, solver_steps=steps, tol=tol,
                                max_batches=args.max_batches)
        row = {"steps": steps, "tol": tol, "ppl": result.perplexity, "mean_steps": result.mean_solver_steps,
               "max_steps_taken": result.max_solver_steps, "evals_per_token":
               evaluations_per_token(result.mean_solver_steps, per_step), "max_residual": result.max_residual,
               "eval_seconds": result.seconds}
        print(f"  steps {steps:>2} tol {tol if tol is not None else '-':>5}: ppl {row['ppl']:.3f}, mean steps "
              f"{row['mean_steps']:.2f}, evals/token {row['evals_per_token']:.2f}, {result.seconds:.0f}s", flush=True)
        return row

    print(f"checkpoint {meta['path']} (step {meta.get('step')}): {config.solver}, trained {config.eval_max_steps} "
          f"steps deep; validation {len(tokens):,} tokens, seq_len {seq_len}", flush=True)
    fixed = [score(k, None) for k in args.steps]
    adaptive = [score(m, t) for m in args.max_steps for t in args.tols]

    start = torch.tensor(tokens[: args.prompt * max(args.batches)], dtype=torch.long)
    settings_list = [(k, None) for k in args.steps] + [(m, t) for m in args.max_steps for t in args.tols]
    speed: dict[int, dict] = {}
    for batch in args.batches:
        prompts = start[: args.prompt * batch].view(batch, args.prompt)
        if args.prompt + args.new > config.max_position_embeddings:
            raise SystemExit(f"--prompt + --new must fit the context ({config.max_position_embeddings})")
        print(f"generation, batch {batch}", flush=True)
        speed[batch] = generation_speed(model, prompts, args.new, args.repeats, settings_list)
    config.inference_max_steps, config.inference_tol = own

    for row in fixed + adaptive:
        key = (row["steps"], row["tol"])
        row["generation"] = {str(b): {"tokens_per_sec": speed[b][key][0], "mean_steps": speed[b][key][1]}
                             for b in args.batches}

    # the verdict
    best_ppl = min(r["ppl"] for r in fixed)
    good_fixed = [r for r in fixed if r["ppl"] <= 1.01 * best_ppl]
    cheapest = min(good_fixed, key=lambda r: r["evals_per_token"])
    verdicts = []
    for r in adaptive:
        ok_ppl = r["ppl"] <= 1.01 * best_ppl
        ratio = r["evals_per_token"] / cheapest["evals_per_token"]
        speedups = {b: r["generation"][str(b)]["tokens_per_sec"] / cheapest["generation"][str(b)]["tokens_per_sec"]
                    for b in args.batches}
        verdicts.append((r, ok_ppl, ratio, speedups, ok_ppl and ratio <= 0.7 and speedups[1] >= 1.3))
    write_report(args, meta, config, fixed, adaptive, cheapest, best_ppl, verdicts, per_step)


def write_report(args, meta, config, fixed, adaptive, cheapest, best_ppl, verdicts, per_step) -> None:
    import torch

    args.out_dir.mkdir(parents=True, exist_ok=True)
    batches = args.batches
    gen_cols = " | ".join(f"tok/s b{b} | steps b{b}" for b in batches)
    header = f"| setting | ppl | mean steps | max steps | evals/token | {gen_cols} |"
    rule = "|---|---:|---:|---:|---:|" + "---:|---:|" * len(batches)

    def line(r):
        name = f"{r['steps']} steps" if r["tol"] is None else f"tol {r['tol']:g} (<= {r['steps']})"
        gen = " | ".join(f"{g['tokens_per_sec']:.1f} | {g['mean_steps']:.2f}"
                         for g in (r["generation"][str(b)] for b in batches))
        return (f"| {name} | {r['ppl']:.3f} | {r['mean_steps']:.2f} | {r['max_steps_taken']} | "
                f"{r['evals_per_token']:.2f} | {gen} |")

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"# Adaptive depth: `python benchmarks/adaptive_depth.py {args.checkpoint}`", "",
        f"Machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. Model: "
        f"`{meta['path']}` (step {meta.get('step')}), {config.solver} solver (evaluations of f per token = "
        f"1 + {per_step} x steps), trained {config.eval_max_steps} steps deep, block skip {config.block_skip}. "
        f"Validation split{'' if args.max_batches is None else f' (first {args.max_batches} batches)'}; "
        f"generation: greedy, exact KV cache, prompt {args.prompt} + {args.new} new tokens, best of {args.repeats}.",
        "", header, rule, *[line(r) for r in fixed], *[line(r) for r in adaptive], "",
        f"Best fixed perplexity {best_ppl:.3f}; the cheapest fixed count within 1% of it: {cheapest['steps']} steps "
        f"({cheapest['evals_per_token']:.1f} evaluations per token).", "",
        "| tolerance | ppl within 1% | evals vs that count (<= 0.7x) | " +
        " | ".join(f"generation speed b{b} (>= 1.3x at b1)" for b in batches) + " | target |",
        "|---|---|---:|" + "---:|" * len(batches) + "---|",
    ]
    for r, ok_ppl, ratio, speedups, ok in verdicts:
        lines.append(f"| {r['tol']:g} (<= {r['steps']}) | {'yes' if ok_ppl else 'no'} ({r['ppl'] / best_ppl:.3f}x) | "
                     f"{ratio:.2f}x | "
                     + " | ".join(f"{speedups[b]:.2f}x" for b in batches) + f" | {'met' if ok else 'missed'} |")
    met = [r for r, *_, ok in verdicts if ok]
    met_tols = ", ".join(f"{r['tol']:g} (<= {r['steps']} steps)" for r in met)
    verdict = f"met at tol {met_tols}." if met else "the target is missed at every tolerance tried."
    lines += ["", "Verdict: " + verdict]
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(
        {"checkpoint": str(meta["path"]), "fixed": fixed, "adaptive": adaptive, "best_ppl": best_ppl,
         "cheapest_fixed_steps": cheapest["steps"], "machine": cpu}, indent=2) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["evals_per_token"] for r in fixed], [r["ppl"] for r in fixed], "o-", label="fixed steps")
    for r in fixed:
        ax.annotate(str(r["steps"]), (r["evals_per_token"], r["ppl"]), fontsize=7)
    for limit in args.max_steps:
        rows = [r for r in adaptive if r["steps"] == limit]
        ax.plot([r["evals_per_token"] for r in rows], [r["ppl"] for r in rows], "s-",
                label=f"adaptive (tol, <= {limit} steps)")
        for r in rows:
            ax.annotate(f"{r['tol']:g}", (r["evals_per_token"], r["ppl"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("block evaluations per token (mean)")
    ax.set_ylabel("validation perplexity")
    top = min(max(r["ppl"] for r in fixed + adaptive), 3 * best_ppl)
    ax.set_ylim(0.98 * best_ppl, top)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(args.out_dir / f"{args.name}.png", bbox_inches="tight", dpi=110)


if __name__ == "__main__":
    main()
