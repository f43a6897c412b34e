"""Runs ``examples/parallelisation_remote.py`` against a real ``statehost serve``.

The example is the seed notebook driven through ``statehost.connect``; it must
print the seed's values, as ``examples/parallelisation.py`` does (the expected
values and the parsing helpers come from that example's test), with the
outputs printed as the same ``Array(...)``s. ``tests/examples/test_notebooks.py``
compares every cell's text with the seed's, run as a notebook.
"""

import math
import re

import numpy as np
import pytest

# The two notebook checks that read the same lines either way run again here, on this
# module's ``stdout`` fixture (the remote example's output).
from tests.examples.test_parallelisation_example import (  # noqa: F401
    REPO_ROOT,
    SAMPLE_SHARED,
    _lines,
    _numbers,
    _section,
    run_example,
    test_origin_fun_repr,
    test_state_in_axes,
)
from tests.serving import running_server

EXAMPLE = REPO_ROOT / "examples" / "parallelisation_remote.py"

# A printed jax.Array, or a numpy array (what a call's output must not be): its class,
# its numbers, then its keyword arguments (dtype=..., ...).
_ARRAY = re.compile(r"^(array|Array)\((\[.*?\]),\s+(dtype=[^)]*)\)$", re.MULTILINE | re.DOTALL)


def _run_example(env):
    return run_example(EXAMPLE, env)


@pytest.fixture(scope="module")
def stdout(tmp_path_factory):
    """The example's standard output, run once against one server for the whole module."""
    with running_server(tmp_path_factory.mktemp("serve")) as served:
        try:
            return _run_example({"STATEHOST_URL": served.url, "STATEHOST_TOKEN": served.token})
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server output ---\n{served.output()}") from None


@pytest.fixture(scope="module")
def arrays(stdout):
    """Every printed array as (class name, numbers, keyword text), in print order."""
    found = [(cls, _numbers(body), kwargs) for cls, body, kwargs in _ARRAY.findall(stdout)]
    # add_with_scale, sample_normal, sample_shared, and the final model.weight.value.
    assert len(found) == 4, stdout
    return found


def test_local_device_count(stdout):
    assert _lines(stdout)[0] == "local device count: 8"


def test_server_device_count(stdout):
    assert _lines(stdout)[1] == "server device count: 8"


def test_updated_shape(stdout):
    assert "updated shape: (8, 4)" in _lines(stdout)


def test_final_weights_pulled_into_the_local_model(stdout):
    text = _section(stdout, "final weights:", "weights after pairwise update:")

    np.testing.assert_array_equal(_numbers(text), np.arange(1.0, 33.0))
    assert text.count("\n") == 8  # printed as 8 rows


def test_weights_after_pairwise_update_on_two_server_devices(stdout):
    text = _section(stdout, "weights after pairwise update:", "Array(")

    np.testing.assert_array_equal(_numbers(text), [2.0] * 4 + [0.0] * 4)
    assert text.strip().startswith("[[") and text.count("\n") == 2


def test_add_with_scale(arrays):
    cls, values, kwargs = arrays[0]

    np.testing.assert_array_equal(values, np.arange(8) + 0.5)
    assert (cls, kwargs) == ("Array", "dtype=float32, weak_type=True")  # as the seed shows


def test_sample_normal_prints_eight_finite_numbers(arrays):
    cls, values, kwargs = arrays[1]

    assert values.shape == (8,)
    assert all(math.isfinite(v) for v in values)
    assert len(set(values)) == 8  # one key per device
    assert (cls, kwargs) == ("Array", "dtype=float32")


def test_sample_shared(arrays):
    cls, values, kwargs = arrays[2]

    np.testing.assert_allclose(values, SAMPLE_SHARED, rtol=0, atol=1e-5)
    assert (cls, kwargs) == ("Array", "dtype=float32")


def test_client_pmap_returns_the_seeds_stateful_mapping(stdout):
    assert "<class 'statehost.transform.StatefulMapping'>" in _lines(stdout)


def test_final_weight_value_after_custom_mapping(arrays):
    cls, values, kwargs = arrays[3]

    np.testing.assert_array_equal(values, np.full(32, 2.0))
    assert (cls, kwargs) == ("Array", "dtype=float32")  # pulled back as a jax.Array


def test_final_weight_value_is_printed_as_8_rows(stdout):
    last = stdout[stdout.rindex("Array(") :]

    assert last.count("[2., 2., 2., 2.]") == 8


def test_example_finds_the_token_a_local_server_wrote(tmp_path):
    """With no $STATEHOST_TOKEN, connect reads $XDG_CONFIG_HOME/statehost/token."""
    with running_server(tmp_path, token=None) as served:
        env = {"STATEHOST_URL": served.url, "XDG_CONFIG_HOME": served.env["XDG_CONFIG_HOME"]}
        try:
            out = _run_example(env)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server output ---\n{served.output()}") from None

    assert "updated shape: (8, 4)" in _lines(out)
    assert out.rstrip().endswith("dtype=float32)")
