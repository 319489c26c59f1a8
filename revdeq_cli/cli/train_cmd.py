"""`revdeq train`: resolve the settings (preset < --config < REVDEQ_* env < --set < flags), then train.

Also runs under torchrun (`torchrun --nproc_per_node N -m revdeq_cli train ...`): each process joins the
group, rank 0 prints and saves. Heavy imports happen inside the command.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from revdeq_cli.cli.app import app

# CLI option -> dotted setting (docs/DESIGN.md §3); the option spelling is what error messages name.
FLAGS: dict[str, tuple[str, str]] = {
    "preset": ("model.preset", "--preset"),
    "recipe": ("train.recipe", "--recipe"),
    "dataset": ("data.dataset", "--dataset"),
    "dataset_config": ("data.dataset_config", "--dataset-config"),
    "tokenizer": ("data.tokenizer", "--tokenizer"),
    "offline": ("data.offline", "--offline"),
    "seq_len": ("data.seq_len", "--seq-len"),
    "out_dir": ("train.out_dir", "--out-dir"),
    "max_steps": ("train.max_steps", "--max-steps"),
    "epochs": ("train.epochs", "--epochs"),
    "max_tokens": ("train.max_tokens", "--max-tokens"),
    "batch_size": ("train.batch_size", "--batch-size"),
    "grad_accum": ("train.grad_accum", "--grad-accum"),
    "lr": ("train.lr", "--lr"),
    "precision": ("train.precision", "--precision"),
    "compile_": ("train.compile", "--compile"),
    "device": ("train.device", "--device"),
    "eval_every": ("train.eval_every", "--eval-every"),
    "save_every": ("train.save_every", "--save-every"),
    "resume": ("train.resume", "--resume"),
    "overwrite": ("train.overwrite", "--overwrite"),
    "seed": ("train.seed", "--seed"),
    "solver": ("solver.solver", "--solver"),
    "adjoint": ("solver.adjoint", "--adjoint"),
    "beta": ("solver.beta", "--beta"),
    "tol": ("solver.tol", "--tol"),
    "solver_steps": ("solver.max_steps", "--solver-steps"),
    "progress": ("log.progress", "--progress"),
}

_MODEL = "Model and solver"
_DATA = "Data"
_LOOP = "Training loop"
_RUN = "Run"


@app.command("train")
def train_command(
    config: Path | None = typer.Option(None, "--config", help="YAML settings file (sectioned, dotted or the "
                                       "earlier port's flat keys).", rich_help_panel=_RUN),
    preset: str | None = typer.Option(None, "--preset", help="Model size: tiny, small, base, paper "
                                      "(default tiny); the recipe is chosen apart (--recipe).", rich_help_panel=_MODEL),
    recipe: str | None = typer.Option(None, "--recipe", help="How the model solves and trains: equilibrium "
                                      "(revdeq's, the default) or paper (the reference implementation's method).",
                                      rich_help_panel=_MODEL),
    dataset: str | None = typer.Option(None, "--dataset", help="pydoc or stdlib (offline), wikitext, "
                                       "wikitext-103, a hub id or a local path (default pydoc).",
                                       rich_help_panel=_DATA),
    dataset_config: str | None = typer.Option(None, "--dataset-config", help="Hub dataset configuration name.",
                                              rich_help_panel=_DATA),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="byte, bpe[:SIZE], a hub id or a path "
                                         "(default byte).", rich_help_panel=_DATA),
    offline: bool | None = typer.Option(None, "--offline/--online", help="Never touch the network.",
                                        show_default=False, rich_help_panel=_DATA),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per training sequence (default 128).",
                                       rich_help_panel=_DATA),
    out_dir: Path | None = typer.Option(None, "--out-dir", help="The run directory (default "
                                        "runs/<dataset>-<timestamp>).", rich_help_panel=_RUN),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimiser steps (default 1200 "
                                         "when no other limit is set).", rich_help_panel=_LOOP),
    epochs: float | None = typer.Option(None, "--epochs", help="Stop after this many passes over the data.",
                                        rich_help_panel=_LOOP),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop after this many training tokens.",
                                          rich_help_panel=_LOOP),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per micro-batch per process "
                                          "(default 16).", rich_help_panel=_LOOP),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimiser step "
                                          "(default 1).", rich_help_panel=_LOOP),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: 3e-3 for the tiny preset, "
                                    "2e-3 otherwise).", rich_help_panel=_LOOP),
    solver: str | None = typer.Option(None, "--solver", help="reversible, picard, relaxed, anderson, broyden, "
                                      "explicit.", rich_help_panel=_MODEL),
    adjoint: str | None = typer.Option(None, "--adjoint", help="reversible, unrolled, implicit, phantom "
                                       "(default: follows --solver; reversible -> reversible, picard/relaxed -> "
                                       "unrolled, anderson/broyden -> implicit).", rich_help_panel=_MODEL),
    beta: float | None = typer.Option(None, "--beta", help="Relaxation in (0, 2), not 1 for reversible.",
                                      rich_help_panel=_MODEL),
    tol: float | None = typer.Option(None, "--tol", help="Solver stop tolerance on the relative residual "
                                     "(0: always --solver-steps).", rich_help_panel=_MODEL),
    solver_steps: int | None = typer.Option(None, "--solver-steps", help="Maximum solver steps in training.",
                                            rich_help_panel=_MODEL),
    precision: str | None = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 (default auto: "
                                         "bf16 where the CPU or GPU multiplies bfloat16 natively, else fp32).",
                                         rich_help_panel=_LOOP),
    compile_: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the solver's "
                                         "block(s) f (default off; unavailable: a warning, then eager).",
                                         rich_help_panel=_LOOP),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default auto).",
                                      rich_help_panel=_LOOP),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Validate every N steps (0: only at the "
                                          "end) (default 100).", rich_help_panel=_LOOP),
    save_every: int | None = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: only at the "
                                          "end) (default 200).", rich_help_panel=_RUN),
    resume: str | None = typer.Option(None, "--resume", help="auto (newest checkpoint of the run dir) or a "
                                      "checkpoint / run directory.", rich_help_panel=_RUN),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="Start afresh in an --out-dir that holds "
                                          "another run: delete that run's checkpoints, logs and config.yaml "
                                          "first (without it such a directory is refused).", show_default=False,
                                          rich_help_panel=_RUN),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default 0).", rich_help_panel=_LOOP),
    progress: str | None = typer.Option(None, "--progress", help="auto, rich or plain (default auto).",
                                        rich_help_panel=_RUN),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Any setting, e.g. "
                                   "--set train.weight_decay=0.05 (repeatable).", rich_help_panel=_RUN),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved settings as YAML and "
                                      "exit.", rich_help_panel=_RUN),
) -> None:
    """Train a RevDEQ language model. With no options: a small model on the offline pydoc corpus, a few
    minutes on a laptop CPU."""
    values = locals()
    flags = {dotted: (str(values[name]) if isinstance(values[name], Path) else values[name])
             for name, (dotted, _) in FLAGS.items()}
    flag_names = {dotted: option for dotted, option in FLAGS.values()}

    from revdeq_cli.settings import DataSettings, SettingsWarning, merge_layers, resolve_settings

    shown: set[str] = set()  # settings are resolved twice when resuming; warn once

    def resolve(base: dict | None = None, base_source: str = ""):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SettingsWarning)
            try:
                return resolve_settings(config_file=config, sets=set_, flags=flags, flag_names=flag_names,
                                        base=base, base_source=base_source)
            finally:
                _show(caught)

    def _show(caught: list[warnings.WarningMessage]) -> None:
        for w in caught:
            if issubclass(w.category, SettingsWarning):
                if str(w.message) not in shown:
                    shown.add(str(w.message))
                    typer.echo(f"revdeq: warning: {w.message}", err=True)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    # Resuming continues the run as it was configured: its stored settings sit beneath everything given
    # now, so only the resume target is read before the full merge.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SettingsWarning)  # `resolve` below reports them
        given, _ = merge_layers(config_file=config, sets=set_, flags=flags, flag_names=flag_names)
    # The resume target is opened (every file checked, training_state.pt complete) before anything is
    # written, so a damaged checkpoint is one line and leaves the run directory as it was.
    stored, opened = None, None
    if given.get("train.resume") is not None:
        from revdeq_cli.checkpoints.layout import find_resume_checkpoint
        from revdeq_cli.checkpoints.verify import open_checkpoint

        out = given.get("train.out_dir")
        found = find_resume_checkpoint(str(given["train.resume"]), None if out is None else str(out),
                                       str(given.get("data.dataset", DataSettings().dataset)))
        if found is not None:
            opened = open_checkpoint(found, resume=True)
            stored = opened.training_state.get("settings")
    settings = resolve(stored, f"the settings of {found}") if isinstance(stored, dict) else resolve()
    if print_config:
        typer.echo(settings.to_yaml(), nl=False)
        raise typer.Exit()

    from revdeq_cli.training import train
    from revdeq_cli.training.loop import TrainingStopped

    try:
        train(settings, resume=opened)  # the checkpoint opened above: the trainer does not open it again
    except TrainingStopped as stop:  # saved at a step boundary: exit as the signal would have (130, 143, 138)
        raise typer.Exit(stop.exit_code) from None
