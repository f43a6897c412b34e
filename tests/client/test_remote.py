"""``statehost.client._remote``: remote tracebacks name the user's files and notebook cells."""

import linecache
import sys
import types

import jax.numpy as jnp
import pytest

import statehost.client
from statehost.client._remote import localize_traceback

CELL_FILE = "/tmp/ipykernel_4242/1234567.py"  # where ipykernel compiles a cell
CELL_SOURCE = (
    "import jax.numpy as jnp\n"
    "\n"
    "def fails(x):\n"
    "    y = x + 1\n"
    "    return y + jnp.ones(3) @ jnp.ones(4)\n"
)


class FakeCompiler:
    """IPython's CachingCompiler as far as tracebacks use it: file name -> cell label."""

    def __init__(self, cells):
        self.cells = cells

    def format_code_name(self, name):
        if name in self.cells:
            return "Cell", f"In[{self.cells[name]}]"
        return None


@pytest.fixture
def cell_function(monkeypatch):
    """``fails`` defined in cell In[2] of a (fake) running IPython, as a notebook defines it."""
    shell = types.SimpleNamespace(compile=FakeCompiler({CELL_FILE: 2}))
    monkeypatch.setitem(sys.modules, "IPython",
                        types.SimpleNamespace(get_ipython=lambda: shell))
    linecache.cache[CELL_FILE] = (len(CELL_SOURCE), None, CELL_SOURCE.splitlines(True),
                                  CELL_FILE)
    namespace = {"__name__": "__main__"}  # shipped by value, as notebook code is
    exec(compile(CELL_SOURCE, CELL_FILE, "exec"), namespace)
    yield namespace["fails"]
    linecache.cache.pop(CELL_FILE, None)


def test_a_frame_from_a_notebook_cell_is_named_as_ipython_names_it(cell_function):
    text = ('Traceback (most recent call last):\n'
            '  File "<dynamic-code>", line 5, in fails\n'
            'TypeError: boom\n')

    fixed = localize_traceback(text, cell_function)

    assert fixed == ("Traceback (most recent call last):\n"
                     "  Cell In[2], line 5, in fails\n"
                     "    return y + jnp.ones(3) @ jnp.ones(4)\n"
                     "TypeError: boom\n")
    assert CELL_FILE not in fixed


def test_a_remote_call_from_a_cell_names_the_cell(client, cell_function):
    with pytest.raises(statehost.client.RemoteExecutionError) as info:
        client.jit(cell_function)(jnp.ones(()))

    text = info.value.remote_traceback
    assert "  Cell In[2], line 5, in fails\n    return y + jnp.ones(3) @ jnp.ones(4)" in text
    assert CELL_FILE not in text and "<dynamic-code>" not in text
    assert "Cell In[2], line 5" in str(info.value)


def test_a_frame_from_a_file_keeps_its_file_name(monkeypatch):
    def from_a_file(x):
        return x

    line = from_a_file.__code__.co_firstlineno + 1
    text = f'  File "<dynamic-code>", line {line}, in from_a_file\n'
    shell = types.SimpleNamespace(compile=FakeCompiler({}))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))

    fixed = localize_traceback(text, from_a_file)

    assert fixed == f'  File "{__file__}", line {line}, in from_a_file\n    return x\n'


def test_without_a_running_ipython_frames_name_files(monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    namespace = {}
    exec(compile("def f(x):\n    return x\n", CELL_FILE, "exec"), namespace)

    fixed = localize_traceback('  File "<dynamic-code>", line 2, in f\n', namespace["f"])

    assert fixed.startswith(f'  File "{CELL_FILE}", line 2, in f')
