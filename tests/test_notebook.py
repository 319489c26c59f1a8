"""notebooks/revdeq_quickstart.ipynb: committed without outputs, trains with the package's defaults, and runs
headless from top to bottom (any cell's error fails the test) with a tiny model chosen through REVDEQ_*
environment variables, in about a minute on a CPU."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "revdeq_quickstart.ipynb"
# The run the test makes: 3 steps of a width-32 model on 32-token sequences. The notebook reads these through the
# settings' environment layer, in the library API and the CLI alike, so its cells stay the package's defaults.
TINY_RUN = {
    "REVDEQ_TRAIN__MAX_STEPS": "3",
    "REVDEQ_TRAIN__BATCH_SIZE": "4",
    "REVDEQ_DATA__SEQ_LEN": "32",
    "REVDEQ_MODEL__HIDDEN_SIZE": "32",
    "REVDEQ_MODEL__INTERMEDIATE_SIZE": "64",
    "REVDEQ_LOG__LOG_EVERY": "1",
}
# Replaces the defaults of the notebook's "parameters" cell: no pip install (no network), no TensorBoard server.
HEADLESS = "INSTALL = False\nLIVE_TENSORBOARD = False"
RUNS = ("runs/quickstart-library", "runs/quickstart-cli")


def read_notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def parameters_cell(nb: nbformat.NotebookNode) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return found[0]


def code_sources(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def stdout_of(nb: nbformat.NotebookNode, marker: str) -> str:
    """The standard output of the one code cell whose source contains `marker`."""
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, marker
    return "".join(o.text for o in cells[0].outputs if o.output_type == "stream" and o.name == "stdout")


def scalar_values(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_committed_without_outputs():
    nb = read_notebook()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs: strip them"
    assert nb.metadata.get("accelerator") == "GPU"  # Colab opens it on a GPU runtime


def test_parameters_default_to_a_real_run():
    nb = read_notebook()
    params: dict[str, object] = {}
    exec(nb.cells[parameters_cell(nb)].source, params)
    assert params["INSTALL"] is True and params["LIVE_TENSORBOARD"] is True
    # The headless override names every parameter, so no default that needs the network survives the test.
    overridden: dict[str, object] = {}
    exec(HEADLESS, overridden)
    assert set(overridden) - {"__builtins__"} == set(params) - {"__builtins__"}


# How the notebook runs the command line: `revdeq` through the kernel's own interpreter, which works from any
# kernel of the environment the package is installed in, whether or not that environment's bin/ is on PATH.
CLI = '!"{sys.executable}" -m revdeq_cli '


def cli_commands(sources: str) -> list[list[str]]:
    """The words after `revdeq` of every command line the notebook runs."""
    return [shlex.split(line.strip()[len(CLI):]) for line in sources.splitlines() if line.strip().startswith(CLI)]


def test_runs_the_cli_through_the_kernels_interpreter():
    sources = "\n".join(code_sources(read_notebook()))
    assert [words[0] for words in cli_commands(sources)] == ["train", "generate", "eval", "inspect"]
    bare = [line for line in sources.splitlines() if re.match(r"^\s*(!|%%bash|%%sh)?\s*revdeq\b", line)]
    assert not bare, f"these need `revdeq` on PATH: {bare}"


def test_trains_with_the_package_defaults():
    """Both ways of training name only their run directory: the recipe is the package's (and, on a GPU,
    precision from the environment), so the notebook follows the defaults as they change."""
    sources = "\n".join(code_sources(read_notebook()))
    cli = [words for words in cli_commands(sources) if words[0] == "train"]
    assert [words[1:] for words in cli] == [["--out-dir", RUNS[1]]]
    library = re.findall(r"resolve_settings\((.*)\)", sources)
    assert library == ['flags={"train.out_dir": str(LIBRARY_RUN)}']
    assert f'LIBRARY_RUN = Path("{RUNS[0]}")' in sources


def test_notebook_runs_headless(tmp_path, monkeypatch):
    nb = read_notebook()
    nb.cells.insert(parameters_cell(nb) + 1, nbformat.v4.new_code_cell(HEADLESS))
    for name, value in TINY_RUN.items():
        monkeypatch.setenv(name, value)
    # The kernel comes from this interpreter's environment, whatever kernels the user has installed: JUPYTER_PATH
    # comes first when Jupyter looks up "python3". No `revdeq` is on PATH (as for a kernel registered from a venv
    # or started by an IDE): the notebook's commands must not need one.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                               if d and not (Path(d) / "revdeq").exists()))
    monkeypatch.delenv("REVDEQ_TRAIN__PRECISION", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any cell's error
    if os.environ.get("REVDEQ_NOTEBOOK_EXECUTED"):  # a copy of the executed notebook, to look at its outputs
        nbformat.write(nb, os.environ["REVDEQ_NOTEBOOK_EXECUTED"])

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "expected the TensorBoard scalars and the residual plots"
    for run in RUNS:
        assert (work / run / "final" / "model.safetensors").is_file()
        assert f"run: {run}" in text
    assert re.search(r"step 3/3 \| loss", text), "training progress lines are missing"
    assert "solver steps" in text and re.search(r"^ *16 +- +\d", text, flags=re.M), "no eval row for 16 solver steps"
    # Same checkpoint weights, same seed: the CLI and transformers' generate() print the same text on a CPU up to
    # the context, where generate() stops and the CLI goes on (cropping the window); the last word may be cut.
    cli_sample, library_sample = (stdout_of(nb, marker) for marker in ('revdeq_cli generate "', "model.generate("))
    common = library_sample.split()[:-1]
    assert cli_sample.startswith("The with statement") and len(common) >= 2
    assert cli_sample.split()[: len(common)] == common
    # The library and the CLI ran the same training: same settings, same seed, on a CPU the same losses.
    library, cli = (dict(scalar_values(work / run, "train/loss")) for run in RUNS)
    assert sorted(library) == sorted(cli) == [1, 2, 3]
    assert list(library.values()) == pytest.approx(list(cli.values()), rel=1e-6)
