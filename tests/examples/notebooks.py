"""The example scripts as real notebooks: convert one to ``.ipynb``, run it in a kernel.

A new user runs the seed as a notebook, not as a script, and a notebook differs
where it matters: a cell's last bare expression is displayed (``execute_result``),
code is compiled into the kernel's temporary files, IPython names the cells in
tracebacks. So the tests run the examples the same way, through nbclient and an
ipykernel of this interpreter.

The scripts mark the seed's cells ``# In [n]:`` and any cell the seed lacks
``# %%``. :func:`script_to_notebook` makes one code cell per marker, dropping
what comes before the first (the module docstring), and turns a cell's last
line ``print(repr(EXPR))`` back into the bare ``EXPR`` the seed has: a script
must print what a notebook displays. Every other line is kept verbatim. Each cell
from ``# In [n]:`` records ``n`` in its metadata (``seed_cell``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default

__all__ = ["cell_text", "run_notebook", "script_to_notebook", "seed_cells"]

_MARKER = re.compile(r"^# (?:In \[(\d+)\]:|%%.*)$")
_PRINT_REPR = re.compile(r"^print\(repr\((.+)\)\)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _code_cell(lines: list[str], seed_cell: int | None) -> Any:
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if lines and (shown := _PRINT_REPR.match(lines[-1])):
        lines[-1] = shown.group(1)
    metadata = {} if seed_cell is None else {"seed_cell": seed_cell}
    return nbformat.v4.new_code_cell("\n".join(lines), metadata=metadata)


def script_to_notebook(path: Path) -> Any:
    """The notebook of an example script: one code cell per ``# In [n]:`` / ``# %%``."""
    cells: list[Any] = []
    current: list[str] | None = None
    seed_cell: int | None = None
    for line in path.read_text().splitlines():
        marker = _MARKER.match(line)
        if marker is None:
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            cells.append(_code_cell(current, seed_cell))
        current, seed_cell = [], int(marker.group(1)) if marker.group(1) else None
    if current is not None:
        cells.append(_code_cell(current, seed_cell))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    return notebook


class _ThisInterpreterKernel(AsyncKernelManager):
    """The ipykernel of the interpreter running the tests, whatever kernelspecs the
    machine has installed (a ``python3`` spec elsewhere could start another Python)."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)


def run_notebook(notebook: Any, cwd: Path, env: dict[str, str], timeout: int = 300) -> Any:
    """Runs every cell of ``notebook`` in one fresh kernel; returns the executed notebook.

    The kernel gets this process's environment without ``JAX_*``, ``XLA_*`` and
    ``STATEHOST_*`` variables, plus ``env``. A cell tagged ``raises-exception`` may
    fail; any other failure raises ``nbclient.exceptions.CellExecutionError``.
    """
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_", "XLA_", "STATEHOST_"))}
    full.update(env)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            kernel_manager_class=_ThisInterpreterKernel,
                            resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=full)


def cell_text(cell: Any) -> str:
    """What the notebook shows under a cell: its streams, then its displayed result."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            parts.append(output["data"]["text/plain"] + "\n")
        elif output["output_type"] == "error":
            parts.append(_ANSI.sub("", "\n".join(output["traceback"])) + "\n")
    return "".join(parts)


def seed_cells(notebook: Any) -> dict[int, Any]:
    """The executed cells that are the seed's, by the seed's cell number."""
    return {cell.metadata["seed_cell"]: cell for cell in notebook.cells
            if "seed_cell" in cell.metadata}
