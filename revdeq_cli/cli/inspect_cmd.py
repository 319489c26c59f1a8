"""`revdeq inspect CHECKPOINT`: what a checkpoint holds, read without loading the model (unless --probe)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from revdeq_cli.cli.app import app
from revdeq_cli.cli.output import echo_json, quiet_libraries, table

if TYPE_CHECKING:  # evaluate imports torch: only for the type, not at CLI start-up
    from revdeq_cli.training.evaluate import PositionResiduals

PROBE_TEXT = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense."
)


@app.command(
    "inspect",
    help=(
        "Describe a checkpoint. Shows its settings, parameter counts (total, embedding, non-embedding), "
        "dtypes, training step and tokens seen, recent losses, and its files. Reads config.json, the "
        "safetensors header and training_state.pt (weights-only); the model is loaded only for --probe."
    ),
    epilog=(
        "Examples:\n\n"
        "  revdeq inspect runs/pydoc-20260101-120000\n\n"
        "  revdeq inspect runs/x/checkpoint-000400 --weights\n\n"
        "  revdeq inspect runs/x/final --probe --probe-steps 16\n\n"
        "  revdeq inspect runs/x/final --probe --tol 0.1 --steps 32   (when each token stops)\n\n"
        "  revdeq inspect models/x/model.safetensors --weights --json"
    ),
)
def inspect(
    checkpoint: Path = typer.Argument(..., help="A checkpoint dir, a run dir (its newest checkpoint), or a "
                                      "model.safetensors file.", show_default=False),
    weights: bool = typer.Option(False, "--weights", help="List every tensor: name, shape, dtype."),
    probe: bool = typer.Option(False, "--probe", help="Run one batch and show the residual after each solver step."),
    probe_text: str = typer.Option(PROBE_TEXT, "--probe-text", help="Text of the --probe batch.",
                                   show_default=False),
    probe_steps: int | None = typer.Option(
        None, "--probe-steps", "--steps", min=1,
        help="Solver steps for --probe (default: the model's inference steps; more shows where the iteration goes)."),
    tol: float | None = typer.Option(
        None, "--tol", show_default=False,
        help="With --probe: also run adaptive depth at this tolerance (> 0) and show how many tokens stop at "
             "each solver step."),
    device: str = typer.Option("cpu", "--device", help="Device for --probe: auto, cpu, cuda, mps."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Describe CHECKPOINT (help text: see the decorator)."""
    from revdeq_cli.checkpoints.inspection import describe_checkpoint
    from revdeq_cli.errors import UserError

    if tol is not None and not probe:
        raise UserError("--tol: needs --probe (it runs the model to see when each token stops)")
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise UserError(f"--tol {tol}: must be a number > 0 (the relative residual at which a token stops)")
    report = describe_checkpoint(checkpoint)
    residuals, stops, positions = _probe(report.path, probe_text, probe_steps, device, tol) if probe else (None,) * 3
    if as_json:
        out = {
            "path": report.path, "config": report.config, "parameters": report.parameters,
            "dtypes": report.dtypes, "training": report.training, "settings": report.settings,
            "recent": {k: [list(p) for p in v] for k, v in report.recent.items()},
            "files": dict(report.files), "metadata": report.metadata,
        }
        if weights:
            out["weights"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                              for t in report.tensors]
        if residuals is not None:
            out["probe"] = {"text": probe_text, "residuals": residuals,
                            "position_residuals": positions[0].residuals}
            if stops is not None:
                out["probe"].update(tol=tol, stopping_steps=stops)
        echo_json(out)
        return
    for line in _summary_lines(report):
        typer.echo(line)
    if weights:
        typer.echo("")
        rows = [(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, f"{t.numel:,}") for t in report.tensors]
        typer.echo(table(("tensor", "shape", "dtype", "elements"), rows))
    if residuals is not None:
        typer.echo("")
        typer.echo(f"probe: {len(probe_text)} characters, relative residual ||z - f(z)|| / ||f(z)|| per step")
        rows = [(k, f"{r:.3e}", "#" * max(1, min(40, round(40 * r / max(residuals[0], 1e-30)))))
                for k, r in enumerate(residuals, start=1)]
        typer.echo(table(("step", "residual", ""), rows, align="rrl"))
        typer.echo(_positions_line(*positions))
    if stops is not None:
        typer.echo("")
        typer.echo(f"adaptive depth at tol {tol:g}: {len(stops)} tokens, mean {sum(stops) / len(stops):.2f} steps, "
                   f"max {max(stops)} of {len(residuals)}; tokens stopping at each step")
        counts = Counter(stops)
        rows = [(k, counts[k], "#" * round(40 * counts[k] / len(stops))) for k in range(1, len(residuals) + 1)
                if counts[k]]
        typer.echo(table(("step", "tokens", ""), rows, align="rrl"))


def _positions_line(positions: PositionResiduals, tokens: list[str]) -> str:
    """One line: how the probe's positions (`PositionResiduals`) stand after its last step, the least settled
    named by the token each reads."""
    from revdeq_cli.training.evaluate import UNSETTLED

    r = positions.residuals
    line = (f"positions after {positions.steps} steps: median {positions.median:.1e}, max {max(r):.1e}, "
            f"{positions.unsettled} of {len(r)} above {UNSETTLED:g}")
    return line + "; least settled: " + ", ".join(f"{tokens[i]!r} (position {i}) {r[i]:.1e}"
                                                  for i in positions.least_settled())


def _probe(path: Path, text: str, steps: int | None, device_spec: str,
           tol: float | None = None) -> tuple[list[float], list[int] | None, tuple[PositionResiduals, list[str]]]:
    import torch

    from revdeq_cli.checkpoints import load_checkpoint
    from revdeq_cli.errors import CheckpointError, UserError
    from revdeq_cli.training.distributed import resolve_device
    from revdeq_cli.training.evaluate import probe_position_residuals, probe_residuals, probe_stopping_steps

    quiet_libraries()
    model, tokenizer, _, _ = load_checkpoint(path, device=resolve_device(device_spec))
    if tokenizer is None:
        raise CheckpointError(f"{path}: has no tokenizer files, which --probe needs to encode its text")
    if not model.config.is_deq:
        raise UserError(f"{path}: an explicit (stacked) model has no solver to probe; drop --probe")
    ids = tokenizer(text)["input_ids"][: model.config.max_position_embeddings]
    if not ids:
        raise UserError("--probe-text: encodes to no tokens; give some text")
    batch = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    residuals = probe_residuals(model, batch, steps)
    stops = probe_stopping_steps(model, batch, tol, len(residuals)) if tol is not None else None
    tokens = [tokenizer.decode([i]) for i in ids]  # what each position reads, for the least settled ones
    return residuals, stops, (probe_position_residuals(model, batch, len(residuals)), tokens)


def _solver_line(c: dict, infer: object) -> str:
    """How the model runs: its block, start and inference depth and readout (from config.json)."""
    midpoint = c.get("inference_readout") == "midpoint" and c.get("solver") == "reversible"
    return (f"block        skip {c.get('block_skip', 'state')}, start z0 = "
            f"{'x' if c.get('init_state') == 'input' else '0'}; inference {infer} steps"
            + (", read at the pair's midpoint (y + z) / 2" if midpoint else ", read at z_N"))


def _objective_line(c: dict, settings: dict) -> str | None:
    """How the run trained the model to iterate (the run's settings: a shared model directory has none), or None."""
    from revdeq_cli.errors import UserError
    from revdeq_cli.settings import settings_from_dict

    try:
        s = settings_from_dict(settings, "the checkpoint's settings")
    except UserError:
        return None
    o = s.objective
    rule = f"{c.get('max_steps')} differentiated" + (f" after {o.detached_steps} graph-free"
                                                     if o.detached_steps != "0" else "")
    extras = []
    if o.fixed_point_penalty:
        extras.append(f"fixed point penalty {o.fixed_point_penalty:g}" + (
            f" over the worst {o.penalty_tail:.0%} of positions (by residual)" if o.penalty_tail < 1 else ""))
        if o.penalty_ramp:
            extras.append(f"ramped in over the first {o.penalty_ramp:.0%} of steps")
    if o.next_iterate_loss:
        extras.append(f"+ {o.next_iterate_loss:g} x the cross-entropy read one step on, at f(z_N)")
    return (f"objective    recipe {s.train.recipe}: {rule} solver steps per batch"
            + "".join(f", {e}" for e in extras))


def _summary_lines(report) -> list[str]:
    from revdeq_cli.training.metrics import perplexity
    from revdeq_cli.training.progress import format_bytes

    c, p, t, s = report.config, report.parameters, report.training, report.settings
    infer = report.inference_steps
    lines = [f"checkpoint   {report.path}"]
    if c:
        lines.append(f"model        {c.get('solver')} solver / {c.get('adjoint')} adjoint, beta {c.get('beta')}, "
                     f"max_steps {c.get('max_steps')} (inference {infer}), tol {c.get('tol')}, "
                     f"state {c.get('state_dtype')}")
        if c.get("solver") != "explicit":
            lines.append(_solver_line(c, infer))
            if s and (line := _objective_line(c, s)) is not None:
                lines.append(line)
        lines.append(f"shape        hidden {c.get('hidden_size')}, heads {c.get('num_attention_heads')}, "
                     f"intermediate {c.get('intermediate_size')}, context {c.get('max_position_embeddings')}, "
                     f"vocab {c.get('vocab_size')}, layers {c.get('num_hidden_layers')}, "
                     f"tied head {'yes' if c.get('tie_word_embeddings') else 'no'}")
    lines.append(f"parameters   {p['total']:,} total | {p['embedding']:,} embedding | "
                 f"{p['non_embedding']:,} non-embedding")
    lines.append("dtypes       " + ", ".join(f"{d} ({n:,})" for d, n in report.dtypes.items()))
    if t:
        best, final = t.get("best_val_loss"), t.get("final_val_loss")
        val_text = (f", best val loss {best:.4f} (ppl {perplexity(best):.2f}) at step {t.get('best_val_step')}"
                    if isinstance(best, float) else "")
        val_text += (f", final val loss {final:.4f} (ppl {perplexity(final):.2f}, the whole split)"
                     if isinstance(final, float) else "")
        lines.append(f"training     step {t.get('step')} / {t.get('total_steps')}, epoch {t.get('epoch')}, "
                     f"tokens seen {t.get('tokens_seen', 0):,}{val_text}")
    else:
        lines.append("training     no training_state.pt (a converted or exported model)")
    if s:
        d, tr = s.get("data", {}), s.get("train", {})
        config = f" ({d['dataset_config']})" if d.get("dataset_config") else ""
        lines.append(f"data         {d.get('dataset')}{config}, tokenizer "
                     f"{d.get('tokenizer')}, seq_len {d.get('seq_len')}; batch {tr.get('batch_size')} x accum "
                     f"{tr.get('grad_accum')}, lr {tr.get('lr')}, precision {tr.get('precision')}")
    for tag, points in report.recent.items():
        lines.append(f"{tag:<12} " + "  ".join(f"{step}: {value:.4f}" for step, value in points))
    lines.append("files        " + ", ".join(f"{name} ({format_bytes(size)})" for name, size in report.files))
    return lines
