"""Shell completions: completions/ must match what scripts/gen_completions.py makes from the CLI now."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REVDEQ = Path(sys.executable).parent / "revdeq"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_completions", REPO / "scripts" / "gen_completions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_completions"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_completions_are_up_to_date():
    fresh = _generator().render_all()
    assert set(fresh) == {"revdeq.bash", "revdeq.zsh", "revdeq.fish"}
    stale = [name for name, text in fresh.items()
             if not (REPO / "completions" / name).is_file()
             or (REPO / "completions" / name).read_text(encoding="utf-8") != text]
    assert not stale, f"completions/{stale} out of date with the CLI: run `python scripts/gen_completions.py`"


def test_check_mode_detects_a_stale_file(tmp_path):
    gen = _generator()
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "revdeq.fish").write_text("# edited by hand\n")
    assert gen.main(["--out", str(tmp_path), "--check"]) == 1


def test_every_command_and_option_is_in_every_script():
    gen = _generator()
    root_opts, cmds = gen.command_tree()
    scripts = gen.render_all()
    assert {"--version", "--help"} <= {n for o in root_opts for n in o.names}
    for cmd in cmds:
        for text in scripts.values():
            assert cmd.name in text
        for opt in cmd.options:
            long = next(n for n in opt.names if n.startswith("--"))
            assert long in scripts["revdeq.bash"] and long in scripts["revdeq.zsh"]
            assert f"-l {long[2:]}" in scripts["revdeq.fish"]


def _bash_complete(words: list[str]) -> list[str]:
    """Run the bash completion function as bash would for the command line `words` (last = being typed)."""
    script = (REPO / "completions" / "revdeq.bash").read_text()
    words_q = " ".join(f"'{w}'" for w in words)
    call = f"COMP_WORDS=({words_q}); COMP_CWORD={len(words) - 1}; _revdeq"
    program = f"{script}\n{call}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_script_completes_commands_options_and_choices():
    subprocess.run(["bash", "-n", str(REPO / "completions" / "revdeq.bash")], check=True)
    _, cmds = _generator().command_tree()
    assert sorted(_bash_complete(["revdeq", ""])) == sorted(c.name for c in cmds)
    assert _bash_complete(["revdeq", "--vers"]) == ["--version"]
    for cmd in cmds:
        opt = next(o for o in cmd.options if "--help" in o.names)
        assert "--help" in _bash_complete(["revdeq", cmd.name, "--he"]), opt
        for o in cmd.options:
            if o.choices:
                assert sorted(_bash_complete(["revdeq", cmd.name, o.names[0], ""])) == sorted(o.choices)


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_other_shells_parse_the_scripts(shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed; the bash script is checked by running it")
    subprocess.run([shell, "-n", str(REPO / "completions" / f"revdeq.{shell}")], check=True)


@pytest.mark.skipif(not REVDEQ.exists(), reason="the revdeq console script is not installed in this environment")
def test_install_completion_works(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    out = subprocess.run([str(REVDEQ), "--install-completion", "bash"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    installed = tmp_path / ".bash_completions" / "revdeq.sh"
    assert installed.is_file() and "_REVDEQ_COMPLETE" in installed.read_text()
    assert f"source '{installed}'" in (tmp_path / ".bashrc").read_text()
