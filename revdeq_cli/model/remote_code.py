"""Remote code: the modeling code a model directory carries, generated from the package's own modules.

    files = write_remote_code(directory)     # writes the .py files and adds `auto_map` to config.json

`AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)` then needs only torch and
transformers, not revdeq. Nothing here is a second copy of the model: at save time the modules that
`revdeq_cli.model.config` and `revdeq_cli.model.modeling` import (transitively, within `revdeq_cli`) are read
from the installed package and written out one file per module, with only their `revdeq_cli` imports
rewritten into the relative imports transformers' dynamic-module loader follows:

    revdeq_cli.model.config     -> configuration_revdeq.py   (AutoConfig: RevDEQConfig)
    revdeq_cli.model.modeling   -> modeling_revdeq.py        (AutoModelForCausalLM: RevDEQForCausalLM)
    revdeq_cli.deq              -> revdeq_deq.py             (a package's __init__)
    revdeq_cli.deq.adjoints     -> revdeq_deq_adjoints.py    (any other module: revdeq_ + its dotted path)

transformers' rules (5.x `dynamic_module_utils`): the files sit flat in the directory; it copies a module
and, recursively, every file named by a `from .name import ...` line; `auto_map` maps an Auto class name to
"file_stem.ClassName"; every absolute import must be installed (`check_imports`), so no `revdeq_cli` import
may remain. `from revdeq_cli import deq` (a module bound to a name) becomes
`from .revdeq_deq import _this_module as deq`, `_this_module` being a line appended to that file.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "revdeq_cli"
CONFIG_MODULE = f"{PACKAGE}.model.config"
MODELING_MODULE = f"{PACKAGE}.model.modeling"
CONFIG_FILE_STEM = "configuration_revdeq"
MODELING_FILE_STEM = "modeling_revdeq"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_FILE_STEM}.RevDEQConfig",
    "AutoModelForCausalLM": f"{MODELING_FILE_STEM}.RevDEQForCausalLM",
}
SELF_NAME = "_this_module"


@dataclass(frozen=True)
class GeneratedFile:
    """One file of remote code: its name in the model directory, the module it came from, its text."""

    name: str  # e.g. "revdeq_deq_adjoints.py"
    module: str  # e.g. "revdeq_cli.deq.adjoints"
    text: str


def file_stem(module: str) -> str:
    """The file stem (no `.py`) the module `module` (a dotted name inside revdeq_cli) is written as."""
    if module == CONFIG_MODULE:
        return CONFIG_FILE_STEM
    if module == MODELING_MODULE:
        return MODELING_FILE_STEM
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        raise ValueError(f"{module}: not a module inside {PACKAGE}")
    return "revdeq_" + "_".join(parts[1:])


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RuntimeError(f"remote code: cannot find the source file of {module}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package
        return False


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of a (possibly relative) `from ... import` in `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _rewrite_import(node: ast.stmt, module: str, is_package: bool) -> tuple[str, list[tuple[str, bool]]] | None:
    """(replacement source, [(module it needs, whether that module is bound to a name)]) for an import of
    revdeq_cli, or None for any other statement."""
    if isinstance(node, ast.Import):
        names = [alias for alias in node.names if _ours(alias.name)]
        if not names:
            return None
        if len(names) != len(node.names) or any(alias.asname is None for alias in names):
            raise RuntimeError(f"remote code: {module} line {node.lineno}: write `from {PACKAGE}... import "
                               f"name` (or `import {PACKAGE}.x as y`) so the import can be made relative")
        lines = [f"from .{file_stem(a.name)} import {SELF_NAME} as {a.asname}" for a in names]
        return "; ".join(lines), [(a.name, True) for a in names]
    if not isinstance(node, ast.ImportFrom):
        return None
    source = _absolute(node, module, is_package)
    if not _ours(source):
        return None
    plain: list[str] = []
    lines: list[str] = []
    needed: list[tuple[str, bool]] = []
    for alias in node.names:
        if alias.name == "*":
            raise RuntimeError(f"remote code: {module} line {node.lineno}: `import *` cannot be made relative")
        submodule = f"{source}.{alias.name}"
        if _is_module(submodule):  # `from revdeq_cli import deq`: a module bound to a name
            lines.append(f"from .{file_stem(submodule)} import {SELF_NAME} as {alias.asname or alias.name}")
            needed.append((submodule, True))
        else:
            plain.append(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
    if plain:
        if source == PACKAGE:
            raise RuntimeError(f"remote code: {module} line {node.lineno}: import names from their own module, "
                               f"not from the {PACKAGE} package")
        lines.insert(0, f"from .{file_stem(source)} import {', '.join(plain)}")
        needed.append((source, False))
    return "; ".join(lines), needed


def _convert(module: str) -> tuple[str, list[tuple[str, bool]]]:
    """The text of `module` with its revdeq_cli imports made relative, and the modules it imports."""
    path = _source_path(module)
    text = path.read_text(encoding="utf-8")
    is_package = path.name == "__init__.py"
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []
    needed: list[tuple[str, bool]] = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, ast.stmt):
            continue
        rewritten = _rewrite_import(node, module, is_package)
        if rewritten is None:
            continue
        replacement, deps = rewritten
        start, end = node.lineno - 1, (node.end_lineno or node.lineno) - 1
        before, after = lines[start][: node.col_offset], lines[end][node.end_col_offset or 0 :]
        if before.strip() or after.strip().split("#")[0].strip():
            raise RuntimeError(f"remote code: {module} line {node.lineno}: put the import on lines of its own")
        edits.append((start, end, before + replacement + "\n"))
        needed.extend(deps)
    for start, end, replacement in sorted(edits, reverse=True):
        lines[start : end + 1] = [replacement]
    return "".join(lines), needed


def generate_remote_code(version: str | None = None) -> list[GeneratedFile]:
    """The remote-code files for the package as installed now, entry points first, then by module name."""
    if version is None:
        from revdeq_cli.version import __version__ as version
    converted: dict[str, str] = {}
    imported_as_module: set[str] = set()
    pending = [CONFIG_MODULE, MODELING_MODULE]
    while pending:
        module = pending.pop()
        if module in converted:
            continue
        text, needed = _convert(module)
        converted[module] = text
        for dep, as_module in needed:
            pending.append(dep)
            if as_module:
                imported_as_module.add(dep)
    stems = {m: file_stem(m) for m in converted}
    if len(set(stems.values())) != len(stems):
        raise RuntimeError(f"remote code: two modules map to one file name: {sorted(stems.items())}")
    files = []
    for module in sorted(converted, key=lambda m: (m not in (CONFIG_MODULE, MODELING_MODULE), m)):
        header = (f"# Generated by revdeq {version} from its module {module} when this model directory was written.\n"
                  "# The package's own module with its revdeq_cli imports made relative; do not edit.\n")
        body = converted[module]
        if module in imported_as_module:
            body += (f"\n\nimport sys as _sys  # noqa: E402\n\n"
                     f"{SELF_NAME} = _sys.modules[__name__]  # lets `from .{stems[module]} import {SELF_NAME}` "
                     "bind this module\n")
        files.append(GeneratedFile(name=f"{stems[module]}.py", module=module, text=header + body))
    return files


def write_remote_code(directory: str | os.PathLike[str]) -> list[str]:
    """Write the remote-code files into `directory` (which holds a saved config.json) and add `auto_map` to
    its config.json; return the file names written."""
    directory = Path(directory)
    files = generate_remote_code()
    for f in files:
        (directory / f.name).write_text(f.text, encoding="utf-8")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = dict(AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [f.name for f in files]
