"""`revdeq generate [PROMPT]`: sample text from a checkpoint, streamed to stdout; statistics on stderr."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer

from revdeq_cli.cli.app import app
from revdeq_cli.cli.output import quiet_libraries
from revdeq_cli.sampling import SAMPLING


@app.command(
    "generate",
    help=(
        "Generate text from a checkpoint. The prompt comes from PROMPT, --prompt-file, or stdin. The text is "
        "streamed to stdout as it is produced; statistics (tokens/s, solver steps per token, peak memory) go "
        "to stderr. Without --checkpoint the newest checkpoint under ./runs is used. Past the model's context "
        "(the length it trained on) each further token is predicted from the last context tokens, recomputed "
        "without the cache. --solver-steps and --tol set the solver (adaptive depth: each token stops "
        "iterating once its relative residual is below --tol, at most --solver-steps steps)."
    ),
    epilog=(
        "Examples:\n\n"
        "  revdeq generate \"The module\" --max-new-tokens 200\n\n"
        "  revdeq generate -c runs/pydoc-20260101-120000 --temperature 0 \"def \"\n\n"
        "  echo \"Python is\" | revdeq generate --num-samples 3 --seed 1 --top-p 0.9\n\n"
        "  revdeq generate \"def \" --tol 0.1 --solver-steps 32   (adaptive depth)\n\n"
        "  revdeq generate --prompt-file prompt.txt --max_length 256   (the earlier port's flag: counts the prompt)"
    ),
)
def generate(
    prompt: str | None = typer.Argument(None, help="Prompt text (default: --prompt-file, or stdin when piped).",
                                        show_default=False),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint or run dir (default: the newest checkpoint under ./runs).",
        show_default=False),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", help="Read the prompt from this file.",
                                            show_default=False),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1,
                                              help=f"Tokens to generate after the prompt (default "
                                              f"{SAMPLING.max_new_tokens})."),
    max_length: int | None = typer.Option(
        None, "--max_length", "--max-length", min=1,
        help="Alias of the earlier port: total length in tokens, the prompt included."),
    temperature: float = typer.Option(SAMPLING.temperature, "--temperature", min=0.0,
                                      help="0 = greedy (deterministic)."),
    top_k: int = typer.Option(SAMPLING.top_k, "--top-k", min=0, help="Sample from the k most likely tokens; 0 = all."),
    top_p: float = typer.Option(SAMPLING.top_p, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass; 1 = off."),
    repetition_penalty: float = typer.Option(SAMPLING.repetition_penalty, "--repetition-penalty", min=0.0,
                                             help="> 1 discourages repeating tokens; 1 = off."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="Independent samples to draw."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: a fresh one, printed)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence for every token."),
    solver_steps: int | None = typer.Option(
        None, "--solver-steps", min=0, show_default=False,
        help="Solver steps per token (the most, with --tol); 0 = z0, the solver bypassed. Default: the model's "
             "inference_max_steps."),
    tol: float | None = typer.Option(
        None, "--tol", show_default=False,
        help="Adaptive depth: each token stops once its relative residual is below this (> 0). Default: the "
             "model's inference_tol (none: every token runs --solver-steps)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the block(s) f (speeds up --no-cache; "
                                  "with the KV cache, decoding runs eagerly)."),
) -> None:
    """Generate text (help text: see the decorator)."""
    _generate(prompt, checkpoint, prompt_file, max_new_tokens, max_length, temperature, top_k, top_p,
              repetition_penalty, num_samples, seed, no_cache, device, compile_, solver_steps, tol)


def _steps_detail(config, stats) -> str:
    """` (max 12 of 32, tol 0.1)` under adaptive depth; empty otherwise."""
    if not config.is_deq or config.inference_tol is None:
        return ""
    return f" (max {stats.max_solver_steps} of {config.eval_max_steps}, tol {config.inference_tol:g})"


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    from revdeq_cli.errors import UserError

    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt either as PROMPT or with --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--prompt-file {prompt_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--prompt-file {prompt_file}: cannot read as UTF-8 text ({type(err).__name__})") from None
    if prompt is not None:
        return prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


def _generate(prompt, checkpoint, prompt_file, max_new_tokens, max_length, temperature, top_k, top_p,
              repetition_penalty, num_samples, seed, no_cache, device_spec, compile_=False, solver_steps=None,
              tol=None) -> None:
    import random

    import torch
    from transformers import TextStreamer

    from revdeq_cli.checkpoints import load_checkpoint, newest_checkpoint_under
    from revdeq_cli.checkpoints.layout import RUNS_DIR
    from revdeq_cli.errors import CheckpointError, UserError
    from revdeq_cli.training.distributed import resolve_device
    from revdeq_cli.training.generation import generate_sample
    from revdeq_cli.training.progress import format_bytes

    if max_new_tokens is not None and max_length is not None:
        raise UserError("give --max-new-tokens or --max_length (the earlier port's total length), not both")
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise UserError(f"--tol {tol}: must be a number > 0 (the relative residual at which a token stops)")
    text = _read_prompt(prompt, prompt_file)
    if checkpoint is None:
        checkpoint = newest_checkpoint_under(RUNS_DIR)
        typer.echo(f"checkpoint: {checkpoint} (newest under {RUNS_DIR}/)", err=True)
    quiet_libraries()
    model, tokenizer, _, meta = load_checkpoint(checkpoint, device=resolve_device(device_spec))
    if compile_:
        from revdeq_cli.model.compile import compile_blocks

        compile_blocks(model, next(model.parameters()).device.type,
                       warn=lambda m: typer.echo(f"revdeq: warning: {m}", err=True))
    if tokenizer is None:
        raise CheckpointError(f"{meta['path']}: has no tokenizer files; convert it with "
                              "`revdeq convert --tokenizer ...` or use a checkpoint made by `revdeq train`")
    if (solver_steps is not None or tol is not None) and not model.config.is_deq:
        raise UserError(f"--{'solver-steps' if solver_steps is not None else 'tol'}: this is an explicit (stacked) "
                        "model, it has no solver")
    if solver_steps is not None:
        model.config.inference_max_steps = solver_steps
    if tol is not None:
        model.config.inference_tol = tol
    prompt_ids = tokenizer(text)["input_ids"] if text else []
    start = prompt_ids or [tokenizer.eos_token_id]  # no prompt: start a new document
    if max_length is not None:
        if max_length <= len(prompt_ids):
            raise UserError(f"--max_length {max_length}: the prompt alone is {len(prompt_ids)} tokens; "
                            "--max_length counts the prompt, so give more (or use --max-new-tokens)")
        max_new_tokens = max_length - len(prompt_ids)
    max_new_tokens = max_new_tokens or SAMPLING.max_new_tokens
    noted: list[int] = []

    def note_crop(context: int) -> None:  # once per command, however many samples pass the context
        if not noted:
            noted.append(context)
            typer.echo(f"\nnote: past the model's context ({context} tokens): each further token is predicted "
                       f"from the last {context} tokens, recomputed without the cache (slower)", err=True)

    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    for i in range(num_samples):
        if num_samples > 1:
            typer.echo(f"--- sample {i + 1}/{num_samples} ---")
        sys.stdout.write(text)
        sys.stdout.flush()
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stats = generate_sample(model, start, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty,
                                eos_token_id=tokenizer.eos_token_id, use_cache=not no_cache, streamer=streamer,
                                on_crop=note_crop)
        typer.echo(
            f"[sample {i + 1}] {len(stats.token_ids)} tokens in {stats.seconds:.2f}s: "
            f"{stats.tokens_per_sec:.1f} tokens/s, {stats.solver_steps_per_token:.2f} solver steps/token"
            f"{_steps_detail(model.config, stats)}, "
            f"peak memory {format_bytes(stats.peak_memory_bytes)} ({stats.memory_kind}); "
            f"seed {seed}, {'no cache' if no_cache else 'cache'}",
            err=True,
        )
