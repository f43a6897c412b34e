"""The examples run as real notebooks (nbclient + ipykernel): every cell shows the seed's text.

``examples/parallelisation.py`` (local) and ``examples/parallelisation_remote.py``
(through the client, against a real ``statehost serve``) are converted to
``.ipynb`` (``tests/examples/notebooks.py``) and run in one kernel each, as a new
user runs the seed. What each of the seed's cells shows is compared with the
seed's printed output (``shared/seed/parallelisation.md``, copied below so the
test does not depend on that file), with ``statehost`` for ``brainstate``: the
only change the examples make is that import. Cell 6 draws from the default
random stream, which is seeded afresh in every process (in brainstate too), so
only its form is compared. A third notebook checks that a remote traceback
names the notebook's cells as IPython names them.
"""

import re

import nbformat
import numpy as np
import pytest

from tests.examples.notebooks import cell_text, run_notebook, script_to_notebook, seed_cells
from tests.examples.test_parallelisation_example import REPO_ROOT
from tests.serving import running_server

EXAMPLES = REPO_ROOT / "examples"

# What the seed notebook shows under each cell; 6 is random (see the module docstring).
SEED_OUTPUTS = {
    1: "",
    2: "local device count: 8\n",
    3: (
        "updated shape: (8, 4)\n"
        "final weights: [[ 1.  2.  3.  4.]\n"
        " [ 5.  6.  7.  8.]\n"
        " [ 9. 10. 11. 12.]\n"
        " [13. 14. 15. 16.]\n"
        " [17. 18. 19. 20.]\n"
        " [21. 22. 23. 24.]\n"
        " [25. 26. 27. 28.]\n"
        " [29. 30. 31. 32.]]\n"
    ),
    4: "weights after pairwise update: [[2. 2. 2. 2.]\n [0. 0. 0. 0.]]\n",
    5: "Array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5], dtype=float32, weak_type=True)\n",
    7: (
        "Array([1.6226422, 1.8544483, 2.0862544, 2.3180604, 2.5498662, 2.7816722,\n"
        "       3.0134785, 3.2452843], dtype=float32)\n"
    ),
    8: (
        "<class 'brainstate.transform.StatefulMapping'>\n"
        "origin fun: Affine(\n"
        "  weight=ParamState(\n"
        "    value=ShapedArray(float32[2,4])\n"
        "  )\n"
        ")\n"
        "state_in_axes: {0: OfType(<class 'brainstate.ParamState'>)}\n"
    ),
    9: (
        "Array([[2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.],\n"
        "       [2., 2., 2., 2.]], dtype=float32)\n"
    ),
}
DETERMINISTIC = sorted(SEED_OUTPUTS)
# Cell 6 as the seed shows it: Array([ 1.23822   , -0.2782504 , ...], dtype=float32).
# numpy pads the dtype to line up with the values when the array wraps and
# switches to exponent notation when a draw is small, so both forms appear.
_RANDOM_ARRAY = re.compile(r"^Array\(\[([^\]]*)\],\s+dtype=float32\)\n$")


def _random_draws(text: str) -> np.ndarray:
    found = _RANDOM_ARRAY.match(text)
    assert found is not None, text
    return np.array([float(x) for x in found.group(1).replace("\n", " ").split(",")])


def _expected(cell: int) -> str:
    return SEED_OUTPUTS[cell].replace("brainstate", "statehost")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One real server for the remote notebooks of this module."""
    with running_server(tmp_path_factory.mktemp("serve")) as served:
        yield served


def _run(script, env):
    return run_notebook(script_to_notebook(EXAMPLES / script), REPO_ROOT,
                        {"JAX_PLATFORMS": "cpu", **env})


@pytest.fixture(scope="module")
def local_notebook():
    return _run("parallelisation.py", {})


@pytest.fixture(scope="module")
def remote_notebook(served):
    try:
        return _run("parallelisation_remote.py",
                    {"STATEHOST_URL": served.url, "STATEHOST_TOKEN": served.token})
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- server output ---\n{served.output()}") from None


@pytest.fixture(params=["local", "remote"])
def notebook(request):
    return request.getfixturevalue(f"{request.param}_notebook")


def test_the_notebook_has_the_seeds_nine_cells(notebook):
    assert sorted(seed_cells(notebook)) == list(range(1, 10))


@pytest.mark.parametrize("cell", DETERMINISTIC)
def test_each_cell_shows_the_seeds_text(notebook, cell):
    assert cell_text(seed_cells(notebook)[cell]) == _expected(cell)


def test_cell_6_shows_eight_distinct_normal_draws_as_the_seed_does(notebook):
    text = cell_text(seed_cells(notebook)[6])

    values = _random_draws(text)
    assert values.shape == (8,) and np.isfinite(values).all()
    assert len(set(values)) == 8  # one key per device


@pytest.mark.parametrize(
    "text",
    [
        "Array([ 0.5, -1.25,  0.75,  2.5, -0.125,  1.5, -2.75,  0.25], dtype=float32)\n",
        # printed by a CI run: one small draw wraps the line and pads the dtype
        "Array([-1.3899678e+00,  1.3016821e+00,  3.9200929e-01,  9.7765331e-04,\n"
        "        2.2422924e+00, -6.1714400e-02, -2.3496322e-01, -2.8476152e+00],"
        "      dtype=float32)\n",
    ],
)
def test_the_draws_are_read_in_either_of_numpys_layouts(text):
    assert _random_draws(text).shape == (8,)


def test_the_bare_expressions_are_displayed_as_results(notebook):
    for number in (5, 6, 7, 9):
        kinds = [o["output_type"] for o in seed_cells(notebook)[number].outputs]
        assert kinds == ["execute_result"], number


def test_the_remote_notebooks_own_cells_connect_and_close(remote_notebook):
    extra = [c for c in remote_notebook.cells if "seed_cell" not in c.metadata]

    assert [cell_text(c) for c in extra] == ["server device count: 8\n", ""]
    assert extra[0].source.startswith("client = brainstate.connect(")
    assert extra[1].source == "client.close()"


def test_the_converter_splits_on_markers_and_displays_the_last_repr(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(
        '"""Docstring: not a cell."""\n\n'
        "# In [1]:\nx = 1\n\n\n"
        "# %% Not in the seed.\nprint(repr(x))\ny = 2\n\n"
        "# In [2]:\nprint('keep')\nprint(repr(x + y))\n"
    )

    cells = script_to_notebook(script).cells

    assert [c.source for c in cells] == ["x = 1", "print(repr(x))\ny = 2",
                                         "print('keep')\nx + y"]
    assert [c.metadata.get("seed_cell") for c in cells] == [1, None, 2]


# -- remote tracebacks name the cells ---------------------------------------------

TRACEBACK_CELLS = [
    "import os\n\nimport jax.numpy as jnp\n\nimport statehost\n\n"
    "client = statehost.connect(os.environ['STATEHOST_URL'])",
    "def fails(x):\n"
    "    y = x + 1\n"
    "\n"
    "    # the next line raises\n"
    "    return y + jnp.ones(3) @ jnp.ones(4)",
    "fails(1.0)",
    "client.jit(fails)(1.0)",
]


@pytest.fixture(scope="module")
def traceback_notebook(served):
    cells = [nbformat.v4.new_code_cell(source) for source in TRACEBACK_CELLS]
    for cell in cells[2:]:
        cell.metadata["tags"] = ["raises-exception"]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    return run_notebook(notebook, REPO_ROOT, {"JAX_PLATFORMS": "cpu",
                                              "STATEHOST_URL": served.url,
                                              "STATEHOST_TOKEN": served.token})


def test_a_remote_traceback_names_the_cell_as_the_local_one_does(traceback_notebook):
    local, remote = (cell_text(c) for c in traceback_notebook.cells[2:])

    assert "Cell In[2], line 5" in local
    assert "RemoteExecutionError" in remote
    assert ("  Cell In[2], line 5, in fails\n"
            "    return y + jnp.ones(3) @ jnp.ones(4)\n") in remote
    assert "ipykernel_" not in remote and "<dynamic-code>" not in remote
