"""The three layers import each other only as DESIGN.md says, read from the source (ast).

The core (``statehost/``) imports neither the client nor the server; only its lazy doors
(``statehost/_connect.py``, ``statehost/_cli.py``) may, and only inside a function. The
client never imports the server, the server never imports the client, and the core
never imports an HTTP or web library. Every import statement counts, wherever it is,
including those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the import name it has (pyproject's package-dir)
LAYERS = {"statehost": "statehost", "client": "statehost.client", "server": "statehost.server"}
LAZY_DOORS = {"statehost._connect", "statehost._cli"}
WEB_LIBRARIES = {"httpx", "fastapi", "uvicorn", "starlette", "pydantic"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, absolute ("statehost.server.cli", "httpx")
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at module level"
        return f"{self.module} (line {self.line}, {where}) imports {self.target}"


def _module_name(folder: str, path: Path) -> str:
    parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([LAYERS[folder], *parts])


def _imports(module: str, source: str, is_package: bool = False) -> Iterator[Import]:
    """Every import in ``source``: statements, and ``importlib.import_module("...")``."""
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                                          | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, in_function)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                yield Import(module, base, child.lineno, in_function)
                for alias in child.names:  # ``from statehost import server`` imports a module
                    yield Import(module, f"{base}.{alias.name}", child.lineno, in_function)
            elif (isinstance(child, ast.Call) and child.args
                  and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and ast.unparse(child.func) in {"importlib.import_module", "__import__"}):
                yield Import(module, child.args[0].value, child.lineno, in_function)
            yield from visit(child, nested)

    yield from visit(ast.parse(source), False)


def _within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def violations(layer: str, imp: Import) -> list[str]:
    """What is wrong with one import of a module of ``layer`` (core, client or server)."""
    problems = []
    client, server = (_within(imp.target, LAYERS[f]) for f in ("client", "server"))
    if layer == "statehost":
        if (client or server) and not (imp.module in LAZY_DOORS and imp.in_function):
            door = ("; a lazy door imports them only inside a function"
                    if imp.module in LAZY_DOORS else "")
            problems.append(f"{imp}: the core imports neither the client nor the server{door}")
        if imp.target.partition(".")[0] in WEB_LIBRARIES:
            problems.append(f"{imp}: the core imports no HTTP or web library")
    if layer == "client" and server:
        problems.append(f"{imp}: the client never imports the server")
    if layer == "server" and client:
        problems.append(f"{imp}: the server never imports the client")
    return problems


def _all_imports() -> Iterator[tuple[str, Import]]:
    for folder in LAYERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            module = _module_name(folder, path)
            source = path.read_text()
            for imp in _imports(module, source, path.name == "__init__.py"):
                yield folder, imp


def test_every_module_respects_the_layers():
    found: dict[tuple[str, int], str] = {}  # one line per import statement
    for layer, imp in _all_imports():
        for problem in violations(layer, imp):
            found.setdefault((imp.module, imp.line), problem)

    assert list(found.values()) == [], "\n".join(found.values())


def test_every_layer_has_modules():
    layers = {layer for layer, _ in _all_imports()}

    assert layers == set(LAYERS)


# -- the checker itself catches each kind of violation --------------------------------
@pytest.mark.parametrize(("layer", "module", "source", "message"), [
    ("statehost", "statehost._state", "import statehost.server.cli",
     "the core imports neither the client nor the server"),
    ("statehost", "statehost.nn._module", "from statehost import client",
     "the core imports neither the client nor the server"),
    ("statehost", "statehost.util._filter", "def f():\n    from statehost.client import x",
     "the core imports neither the client nor the server"),
    ("statehost", "statehost._cli", "from statehost.server import cli",
     "a lazy door imports them only inside a function"),
    ("statehost", "statehost._cli", "import importlib\nimportlib.import_module('statehost.client')",
     "a lazy door imports them only inside a function"),
    ("statehost", "statehost._wire", "def f():\n    import httpx", "no HTTP or web library"),
    ("statehost", "statehost._state", "from pydantic import BaseModel", "no HTTP or web library"),
    ("client", "statehost.client._http", "def f():\n    from statehost.server import settings",
     "the client never imports the server"),
    ("client", "statehost.client._cli", "from ..server.cli import main",
     "the client never imports the server"),
    ("server", "statehost.server.cli", "from statehost.client._cli import ls",
     "the server never imports the client"),
    ("server", "statehost.server.routes.calls",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from statehost import client",
     "the server never imports the client"),
])
def test_the_checker_catches(layer, module, source, message):
    found = [p for imp in _imports(module, source) for p in violations(layer, imp)]

    assert found and all(message in p for p in found), found


@pytest.mark.parametrize(("layer", "module", "source"), [
    ("statehost", "statehost._connect", "def connect():\n    from statehost.client import x"),
    ("statehost", "statehost._cli", "def main():\n    import importlib\n"
                                    "    importlib.import_module('statehost.server.cli')"),
    ("statehost", "statehost._state", "import statehost.server_side_helpers"),
    ("client", "statehost.client._cli", "import httpx\nfrom statehost._cli import Command"),
    ("server", "statehost.server.cli", "from statehost._cli import Command\nimport fastapi"),
])
def test_the_checker_allows(layer, module, source):
    assert [p for imp in _imports(module, source) for p in violations(layer, imp)] == []


# -- the dispatcher's lazy references -------------------------------------------------
def test_the_dispatcher_and_the_command_modules_name_the_same_commands():
    from statehost import _cli

    owners = {owner.module for owner in _cli._COMMANDS.values()}
    offered = {name: module for module in sorted(owners)
               for name in importlib.import_module(module).COMMANDS}

    assert offered == {name: owner.module for name, owner in _cli._COMMANDS.items()}, (
        "a command module's COMMANDS and statehost._cli._COMMANDS must list the same "
        "commands: add the missing line to the one that lacks it")
