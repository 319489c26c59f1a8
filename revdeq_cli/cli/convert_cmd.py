"""`revdeq convert SOURCE DEST`: a checkpoint, or the earlier port's model.pt, to a slim model directory."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from revdeq_cli.cli.app import app
from revdeq_cli.cli.output import echo_json, quiet_libraries


class SourceFormat(StrEnum):
    auto = "auto"
    checkpoint = "checkpoint"
    revdeq_pytorch = "revdeq-pytorch"


class WeightDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@app.command(
    "convert",
    help=(
        "Convert a checkpoint or a RevDEQ-PyTorch model.pt to a slim model directory. DEST holds config, "
        "weights and tokenizer, no optimiser state; AutoModelForCausalLM.from_pretrained loads it after "
        "`import revdeq_cli`.\n\n"
        "With --from revdeq-pytorch the earlier PyTorch port's model.pt is imported without executing anything "
        "from its pickle; tensors that cannot be mapped are refused. DEST is written atomically: it appears "
        "complete or not at all."
    ),
    epilog=(
        "Examples:\n\n"
        "  revdeq convert runs/pydoc-20260101-120000 models/pydoc-tiny\n\n"
        "  revdeq convert runs/x/best models/x-bf16 --dtype bfloat16\n\n"
        "  revdeq convert old/model.pt models/ported --from revdeq-pytorch --tokenizer gpt2\n\n"
        "Then: python -c \"import revdeq_cli; from transformers import AutoModelForCausalLM; "
        "AutoModelForCausalLM.from_pretrained('models/pydoc-tiny')\""
    ),
)
def convert(
    source: Path = typer.Argument(..., help="A checkpoint dir, a run dir (its newest checkpoint), or a "
                                  "RevDEQ-PyTorch model.pt.", show_default=False),
    dest: Path = typer.Argument(..., help="New model directory to create (must not exist, or be empty).",
                                show_default=False),
    dtype: WeightDtype | None = typer.Option(None, "--dtype", help="Cast the weights (default: keep as stored)."),
    source_format: SourceFormat = typer.Option(
        SourceFormat.auto, "--from",
        help="What SOURCE is: auto (a directory is a checkpoint, a file a RevDEQ-PyTorch model.pt)."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer",
        help="--from revdeq-pytorch only: tokenizer to save beside the weights (byte, a local dir or a hub id)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert SOURCE to the model directory DEST (help text: see the decorator)."""
    from revdeq_cli.errors import UserError
    from revdeq_cli.interop import convert_checkpoint, convert_revdeq_pytorch, detect_source_kind

    quiet_libraries()
    kind = detect_source_kind(source) if source_format is SourceFormat.auto else source_format.value
    dtype_name = dtype.value if dtype is not None else None
    if kind == "revdeq-pytorch":
        result = convert_revdeq_pytorch(source, dest, dtype=dtype_name, tokenizer=tokenizer)
    else:
        if tokenizer is not None:
            raise UserError("--tokenizer: only for --from revdeq-pytorch (a checkpoint brings its own)")
        result = convert_checkpoint(source, dest, dtype=dtype_name)
    if as_json:
        echo_json({"dest": result.dest, "source": result.source, "from": result.source_kind,
                   "dtype": result.dtype, "parameters": result.parameters,
                   "files": dict(result.files), "ignored": result.ignored, "notes": result.notes})
        return
    p = result.parameters
    typer.echo(f"converted {result.source} ({result.source_kind}) -> {result.dest}")
    typer.echo(f"parameters: {p['total']:,} total, {p['embedding']:,} embedding, "
               f"{p['non_embedding']:,} non-embedding; dtype {result.dtype}")
    for name, size in result.files:
        typer.echo(f"  {name:<28} {size:>12,} bytes")
    if result.ignored:
        typer.echo(f"left out: {', '.join(result.ignored)}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
