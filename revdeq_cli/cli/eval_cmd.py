"""`revdeq eval CHECKPOINT`: perplexity and bits per byte, optionally against inference solver steps."""

from __future__ import annotations

import contextlib
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from revdeq_cli.cli.app import app
from revdeq_cli.cli.output import echo_json, quiet_libraries, table


class Split(StrEnum):
    validation = "validation"
    test = "test"


class Readout(StrEnum):
    z = "z"
    midpoint = "midpoint"


@app.command(
    "eval",
    help=(
        "Evaluate a checkpoint: perplexity and bits per byte. Scores the validation or test split of its "
        "dataset (or of --dataset); bits per byte are comparable across tokenizers; tokens/s and mean solver "
        "steps are reported too. Several "
        "--solver-steps values print a table of perplexity against inference-time solver steps: a DEQ can "
        "iterate longer at test time than it trained. --tol sets adaptive depth: each token's position stops "
        "iterating once its own relative residual is below the tolerance (at most --solver-steps); several "
        "values sweep it, and mean steps report the steps per token."
    ),
    epilog=(
        "Examples:\n\n"
        "  revdeq eval runs/pydoc-20260101-120000\n\n"
        "  revdeq eval runs/x/final --split test --solver-steps 1,2,4,8,16\n\n"
        "  revdeq eval runs/x/final --tol 0.3,0.2,0.1 --solver-steps 32\n\n"
        "  revdeq eval models/x --dataset wikitext --json"
    ),
)
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint dir or a run dir (its newest checkpoint).",
                                      show_default=False),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset name or path (default: the run's).",
                                       show_default=False),
    dataset_config: str | None = typer.Option(None, "--dataset-config", help="Hub dataset config name.",
                                              show_default=False),
    split: Split = typer.Option(Split.validation, "--split", help="Which split to score."),
    solver_steps: list[str] | None = typer.Option(
        None, "--solver-steps", help="Inference solver steps: one value or a list (1,2,4,8 or repeated).",
        show_default=False),
    tol: list[str] | None = typer.Option(
        None, "--tol", show_default=False,
        help="Adaptive depth: each position stops once its relative residual is below this tolerance (at most "
             "--solver-steps steps); one value or a list (0.2,0.1 or repeated). 'none' = fixed steps. "
             "Default: the model's own (inference_tol; fixed steps when --solver-steps is given)."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", min=2, show_default=False,
        help="Window length (default: the trained context: the run's seq_len, else the model's "
             "max_position_embeddings)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Windows per batch."),
    max_batches: int | None = typer.Option(None, "--max-batches", min=1,
                                           help="Score only the first N batches (a quick estimate).",
                                           show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the block(s) f."),
    readout: Readout | None = typer.Option(
        None, "--readout", show_default=False,
        help="What the reversible solver's pair (y, z) is read at: z, or the midpoint (y + z) / 2, which sits "
             "between the two states of a 2-cycle of f. Default: the model's own (inference_readout)."),
) -> None:
    """Evaluate CHECKPOINT (help text: see the decorator)."""
    _evaluate(checkpoint, dataset, dataset_config, split.value, solver_steps, seq_len, batch_size,
              max_batches, device, as_json, compile_, tol, readout.value if readout is not None else None)


def parse_steps(values: list[str] | None) -> list[int | None]:
    """`["1,2", "8"]` -> [1, 2, 8]; nothing -> [None] (the model's own inference steps); 0 = z0 itself."""
    from revdeq_cli.errors import UserError

    if not values:
        return [None]
    steps = []
    for item in ",".join(values).split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise UserError(f"--solver-steps: {item!r} is not a whole number >= 0 (0 = z0, the solver bypassed); "
                            "give e.g. 4 or 0,1,2,4,8")
        steps.append(int(item))
    if not steps:
        raise UserError("--solver-steps: no values given; give e.g. 4 or 1,2,4,8")
    return steps


def parse_tols(values: list[str] | None) -> list[Any]:
    """`["0.2,0.1", "none"]` -> [0.2, 0.1, None]; nothing -> [KEEP] (the model's own, see `evaluate_split`)."""
    from revdeq_cli.errors import UserError
    from revdeq_cli.training.evaluate import KEEP

    if not values:
        return [KEEP]
    tols: list[Any] = []
    for item in ",".join(values).split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() == "none":
            tols.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--tol: {item!r} is not a number > 0 (or none, for fixed steps); give e.g. 0.1 or "
                            "0.3,0.2,0.1")
        tols.append(value)
    if not tols:
        raise UserError("--tol: no values given; give e.g. 0.1 or 0.3,0.2,0.1")
    return tols


def _evaluate(checkpoint, dataset, dataset_config, split, solver_steps, seq_len, batch_size, max_batches,
              device_spec, as_json, compile_=False, tol=None, readout=None) -> None:
    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.data import prepare_corpus
    from revdeq_cli.errors import CheckpointError, UserError
    from revdeq_cli.training.distributed import resolve_device
    from revdeq_cli.training.evaluate import solver_steps_sweep

    steps = parse_steps(solver_steps)
    tols = parse_tols(tol)
    quiet_libraries()
    model, tokenizer, settings, meta = load_checkpoint(checkpoint, device=resolve_device(device_spec))
    if compile_:
        from revdeq_cli.model.compile import compile_blocks

        compile_blocks(model, next(model.parameters()).device.type,
                       warn=lambda m: typer.echo(f"revdeq: warning: {m}", err=True))
    path = Path(meta["path"])
    if tokenizer is None:
        raise CheckpointError(f"{path}: has no tokenizer files, which eval needs to encode the dataset")
    if steps != [None] and not model.config.is_deq:
        raise UserError("--solver-steps: this is an explicit (stacked) model, it has no solver steps to vary")
    if tol and not model.config.is_deq:
        raise UserError("--tol: this is an explicit (stacked) model, it has no solver to stop adaptively")
    if readout is not None:
        if model.config.solver != "reversible":
            raise UserError(f"--readout: only the reversible solver has a pair of states to read (this model's "
                            f"solver is {model.config.solver}); leave --readout out")
        model.config.inference_readout = readout
    data = settings.data if settings is not None else None
    if dataset is None:
        if data is None:
            raise UserError(f"--dataset: {path} has no training settings to take the dataset from; pass --dataset")
        dataset, dataset_config = data.dataset, dataset_config or data.dataset_config
    context = model.config.max_position_embeddings  # what the model declares: the context it trained on
    seq_len = seq_len or (min(data.seq_len, context) if data is not None else context)
    if seq_len > context:
        raise UserError(f"--seq-len {seq_len}: longer than the model's context ({context} positions); "
                        f"give at most {context}")
    corpus = prepare_corpus(dataset, dataset_config=dataset_config, tokenizer=str(path),
                            offline=bool(data.offline) if data is not None else False,
                            cache_dir=data.cache_dir if data is not None else None)
    if split not in corpus.splits or len(corpus.splits[split]) < 2:
        raise UserError(f"--split {split}: {corpus.source} has no {split} text to evaluate")
    tokens = corpus.splits[split]
    if not as_json:
        typer.echo(f"checkpoint: {path}" + (f" (step {meta['step']})" if "step" in meta else ""))
        typer.echo(f"data: {corpus.source}, {split} split: {len(tokens):,} tokens, {corpus.split_bytes[split]:,} "
                   f"bytes; seq_len {seq_len}, batch {batch_size}"
                   + (f", first {max_batches} batches only" if max_batches else ""))
    trained_steps = model.config.max_steps if model.config.is_deq else None
    with _progress(len(steps) * len(tols) * _targets(tokens, seq_len, batch_size, max_batches)) as advance:
        results = solver_steps_sweep(model, tokens, steps, tols, split=split, split_bytes=corpus.split_bytes[split],
                                     seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                                     on_batch=advance)
    if as_json:
        echo_json({"checkpoint": path, "step": meta.get("step"), "dataset": corpus.source, "split": split,
                   "seq_len": seq_len, "trained_max_steps": trained_steps,
                   "readout": _readout(model.config),
                   "results": [r.as_dict() for r in results]})
        return
    rows = [(r.solver_steps if r.solver_steps is not None else "-", f"{r.tol:g}" if r.tol is not None else "-",
             f"{r.perplexity:.3f}", f"{r.bits_per_byte:.4f}", f"{r.loss:.4f}", f"{r.mean_solver_steps:.2f}",
             r.max_solver_steps, f"{r.max_residual:.2e}", f"{r.tokens_per_sec:,.0f}")
            for r in results]
    typer.echo(table(("solver steps", "tol", "perplexity", "bits/byte", "loss", "mean steps", "max steps",
                      "max residual", "tokens/s"), rows, align="rrrrrrrrr"))
    if trained_steps is not None:
        typer.echo(f"(trained with max_steps {trained_steps}; inference default {model.config.eval_max_steps}; "
                   f"read at {_readout(model.config)})")


def _readout(config: Any) -> str | None:
    """Where eval mode reads the state: 'z', or 'midpoint (y + z) / 2' of the reversible pair; None: no solver."""
    if not config.is_deq:
        return None
    return "midpoint (y + z) / 2" if config.reads_midpoint else "z"


def _targets(tokens, seq_len: int, batch_size: int, max_batches: int | None) -> int:
    """Targets one pass scores (all of the split's, or those of the first `max_batches` batches)."""
    total = max(len(tokens) - 1, 0)
    return total if max_batches is None else min(total, max_batches * batch_size * seq_len)


@contextlib.contextmanager
def _progress(total: int):
    """A transient progress bar on stderr when it is a terminal; a no-op otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("evaluating"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tokens"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("eval", total=total)
        yield lambda n: bar.advance(task, n)
