"""`revdeq train`: resolve the settings (preset < recipe < --config < REVDEQ_* env < --set < flags), then train.

Also runs under torchrun (`torchrun --nproc_per_node N -m revdeq_cli train ...`): each process joins the
group, rank 0 prints and saves. Heavy imports happen inside the command.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import typer

from revdeq_cli.cli.app import app
from revdeq_cli.settings import field_info, option_help, shown_default

# CLI option -> (dotted setting, option, help panel); the option spelling is what error messages name. Help text
# and shown default come from the settings models (`revdeq_cli.settings.option_help`, `shown_default`).
_MODEL = "Model and solver"
_DATA = "Data"
_LOOP = "Training loop"
_RUN = "Run"
FLAGS: dict[str, tuple[str, str, str]] = {
    "preset": ("model.preset", "--preset", _MODEL),
    "recipe": ("train.recipe", "--recipe", _MODEL),
    "dataset": ("data.dataset", "--dataset", _DATA),
    "dataset_config": ("data.dataset_config", "--dataset-config", _DATA),
    "tokenizer": ("data.tokenizer", "--tokenizer", _DATA),
    "offline": ("data.offline", "--offline", _DATA),
    "seq_len": ("data.seq_len", "--seq-len", _DATA),
    "out_dir": ("train.out_dir", "--out-dir", _RUN),
    "max_steps": ("train.max_steps", "--max-steps", _LOOP),
    "epochs": ("train.epochs", "--epochs", _LOOP),
    "max_tokens": ("train.max_tokens", "--max-tokens", _LOOP),
    "batch_size": ("train.batch_size", "--batch-size", _LOOP),
    "grad_accum": ("train.grad_accum", "--grad-accum", _LOOP),
    "lr": ("train.lr", "--lr", _LOOP),
    "precision": ("train.precision", "--precision", _LOOP),
    "compile_": ("train.compile", "--compile", _LOOP),
    "device": ("train.device", "--device", _LOOP),
    "eval_every": ("train.eval_every", "--eval-every", _LOOP),
    "save_every": ("train.save_every", "--save-every", _RUN),
    "resume": ("train.resume", "--resume", _RUN),
    "overwrite": ("train.overwrite", "--overwrite", _RUN),
    "seed": ("train.seed", "--seed", _LOOP),
    "solver": ("solver.solver", "--solver", _MODEL),
    "adjoint": ("solver.adjoint", "--adjoint", _MODEL),
    "beta": ("solver.beta", "--beta", _MODEL),
    "tol": ("solver.tol", "--tol", _MODEL),
    "solver_steps": ("solver.max_steps", "--solver-steps", _MODEL),
    "progress": ("log.progress", "--progress", _RUN),
}
_OFF = {"offline": "--online", "compile_": "--no-compile"}  # the toggles' second spelling


def _flag(name: str) -> Any:
    """The Typer option of FLAGS[name]: unset (None) unless given, so the layers beneath it decide; its help
    and shown default are the setting's."""
    dotted, option, panel = FLAGS[name]
    if name in _OFF:  # a toggle shows the spelling in force by default
        decl, default = f"{option}/{_OFF[name]}", (option if field_info(dotted).default else _OFF[name])[2:]
    else:
        decl, default = option, shown_default(dotted)
    return typer.Option(None, decl, help=option_help(dotted), show_default=default or False,
                        rich_help_panel=panel)


@app.command("train")
def train_command(
    config: Path | None = typer.Option(None, "--config", help="YAML settings file (sectioned, dotted or the "
                                       "earlier port's flat keys).", rich_help_panel=_RUN),
    preset: str | None = _flag("preset"),
    recipe: str | None = _flag("recipe"),
    dataset: str | None = _flag("dataset"),
    dataset_config: str | None = _flag("dataset_config"),
    tokenizer: str | None = _flag("tokenizer"),
    offline: bool | None = _flag("offline"),
    seq_len: int | None = _flag("seq_len"),
    out_dir: Path | None = _flag("out_dir"),
    max_steps: int | None = _flag("max_steps"),
    epochs: float | None = _flag("epochs"),
    max_tokens: int | None = _flag("max_tokens"),
    batch_size: int | None = _flag("batch_size"),
    grad_accum: int | None = _flag("grad_accum"),
    lr: float | None = _flag("lr"),
    solver: str | None = _flag("solver"),
    adjoint: str | None = _flag("adjoint"),
    beta: float | None = _flag("beta"),
    tol: float | None = _flag("tol"),
    solver_steps: int | None = _flag("solver_steps"),
    precision: str | None = _flag("precision"),
    compile_: bool | None = _flag("compile_"),
    device: str | None = _flag("device"),
    eval_every: int | None = _flag("eval_every"),
    save_every: int | None = _flag("save_every"),
    resume: str | None = _flag("resume"),
    overwrite: bool | None = _flag("overwrite"),
    seed: int | None = _flag("seed"),
    progress: str | None = _flag("progress"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Any setting, e.g. "
                                   "--set train.weight_decay=0.05 (repeatable).", rich_help_panel=_RUN),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved settings as YAML and "
                                      "exit.", rich_help_panel=_RUN),
) -> None:
    """Train a RevDEQ language model. With no options: a small model on the offline pydoc corpus, a few
    minutes on a laptop CPU."""
    values = locals()
    flags = {dotted: (str(values[name]) if isinstance(values[name], Path) else values[name])
             for name, (dotted, _, _) in FLAGS.items()}
    flag_names = {dotted: option for dotted, option, _ in FLAGS.values()}

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
