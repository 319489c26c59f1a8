"""The Dockerfile (Docker does not run here): its install steps must be the README Quickstart's, and its
structure must give a CPU image by default, a CUDA one via `--build-arg BASE=cuda`, entrypoint `revdeq`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# pip options that choose where wheels come from or how pip caches, not what is installed.
SOURCE_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url"}
SOURCE_FLAGS = {"--no-cache-dir", "--upgrade", "-U", "--quiet", "-q"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = current.partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Stage name (or 'final' for an unnamed last stage) -> its instructions; global ARGs under ''."""
    result: dict[str, list[tuple[str, str]]] = {"": []}
    name = ""
    for keyword, args in instructions:
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else "final"
            result[name] = [(keyword, args)]
        else:
            result[name].append((keyword, args))
    return result


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)


def pip_installs(commands: list[str], env: dict[str, str]) -> list[list[str]]:
    """Each `pip install` in `commands` (shell text, `&&`-chains split) as a normalised argument list:
    variables expanded from `env`, quotes removed, wheel-source options dropped."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), part)
            words = shlex.split(expanded, comments=True)
            if words[:2] == ["python", "-m"] or words[:2] == ["python3", "-m"]:
                words = words[2:]
            if words[:2] != ["pip", "install"]:
                continue
            args, skip = [], False
            for w in words[2:]:
                if skip:
                    skip = False
                elif w in SOURCE_OPTIONS_WITH_VALUE:
                    skip = True
                elif w not in SOURCE_FLAGS and not any(w.startswith(o + "=") for o in SOURCE_OPTIONS_WITH_VALUE):
                    args.append(w)
            found.append(["pip", "install", *args])
    return found


def readme_quickstart_commands() -> list[str]:
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.fail("README.md is missing: the Dockerfile must install the way its Quickstart does")
    text = readme.read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "README.md has no '## Quickstart' section"
    block = re.search(r"```(?:bash|sh|console)\n(.*?)```", section.group(1), flags=re.S)
    assert block, "README Quickstart has no ```bash block"
    return [line.strip().removeprefix("$ ") for line in block.group(1).splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def dockerfile():
    instructions = dockerfile_instructions((REPO / "Dockerfile").read_text(encoding="utf-8"))
    return instructions, stages(instructions)


def test_image_installs_exactly_what_the_readme_installs(dockerfile):
    instructions, by_stage = dockerfile
    env = arg_defaults(instructions)
    final_runs = [a for k, a in by_stage["final"] if k == "RUN"]
    docker = pip_installs(final_runs, env)
    readme = pip_installs(readme_quickstart_commands(), env)
    assert readme, "README Quickstart has no pip install command"
    assert docker == readme


def test_cpu_by_default_cuda_by_build_arg(dockerfile):
    instructions, by_stage = dockerfile
    globals_ = arg_defaults(by_stage[""])
    assert globals_["BASE"] == "cpu"
    assert by_stage["final"][0] == ("FROM", "base-${BASE}")
    cpu, cuda = arg_defaults(by_stage["base-cpu"]), arg_defaults(by_stage["base-cuda"])
    assert cpu["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert re.search(r"/whl/cu\d+$", cuda["TORCH_INDEX_URL"])
    assert by_stage["base-cuda"][0][1].split()[0] == "${CUDA_IMAGE}"
    assert globals_["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert by_stage["base-cpu"][0][1].split()[0].startswith("python:3.1")
    # torch comes from the stage's index: the CPU image never pulls CUDA wheels.
    torch_run = next(a for k, a in by_stage["final"] if k == "RUN" and "torch" in a)
    assert "--index-url ${TORCH_INDEX_URL}" in torch_run


def test_entrypoint_and_layer_order(dockerfile):
    _, by_stage = dockerfile
    final = by_stage["final"]
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["revdeq"]
    keywords = [(k, a) for k, a in final if k in ("RUN", "COPY")]
    torch_at = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and "torch" in a)
    copy_at = next(i for i, (k, a) in enumerate(keywords) if k == "COPY")
    package_at = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and "-e" in a)
    assert torch_at < copy_at < package_at  # editing the source does not re-download torch


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs"} <= ignored


def test_parser_sees_through_continuations_and_variables():
    text = 'ARG V=1.0\nFROM x AS a\nRUN apt-get update \\\n    && pip install --no-cache-dir "torch==${V}" \\\n' \
           '    --index-url ${IDX} && echo done\n'
    ins = dockerfile_instructions(text)
    assert pip_installs([a for k, a in ins if k == "RUN"], arg_defaults(ins)) == [["pip", "install", "torch==1.0"]]
