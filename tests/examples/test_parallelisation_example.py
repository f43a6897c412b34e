"""Runs ``examples/parallelisation.py`` and checks it prints what the seed notebook shows.

The expected values are the printed outputs of ``shared/seed/parallelisation.md``,
copied here so the test does not depend on that file. ``sample_normal`` draws
from the default random stream, so only its shape and finiteness are checked.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "parallelisation.py"

_NUMBER = re.compile(r"[-+]?(?:nan|inf|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
# A printed jax.Array: its numbers, then its keyword arguments (dtype=..., ...).
_ARRAY = re.compile(r"^Array\((\[.*?\]),\s+(dtype=[^)]*)\)$", re.MULTILINE | re.DOTALL)

SAMPLE_SHARED = [
    1.6226422,
    1.8544483,
    2.0862544,
    2.3180604,
    2.5498662,
    2.7816722,
    3.0134785,
    3.2452843,
]


def _numbers(text):
    return np.array([float(x) for x in _NUMBER.findall(text)])


def run_example(example, env=None):
    """Runs an example script on 8 CPU devices with ``env`` added (JAX_*, XLA_* and
    STATEHOST_* variables of this process removed); returns its standard output."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_", "XLA_", "STATEHOST_"))}
    full.update(env or {}, JAX_PLATFORMS="cpu")  # the notebook provisions 8 CPU devices
    result = subprocess.run(
        [sys.executable, str(example)],
        cwd=REPO_ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def stdout():
    """The example's standard output (it runs once for the whole module)."""
    return run_example(EXAMPLE)


@pytest.fixture(scope="module")
def arrays(stdout):
    """Every printed ``Array(...)`` as (numbers, keyword text), in print order."""
    found = [(_numbers(body), kwargs) for body, kwargs in _ARRAY.findall(stdout)]
    # add_with_scale, sample_normal, sample_shared, and the final model.weight.value.
    assert len(found) == 4, stdout
    return found


def _section(stdout, start, end):
    """The text after the line starting with ``start`` up to the line starting with ``end``."""
    match = re.search(
        rf"^{re.escape(start)}(.*?)^{re.escape(end)}", stdout, re.MULTILINE | re.DOTALL
    )
    assert match is not None, stdout
    return match.group(1)


def _lines(stdout):
    return stdout.splitlines()


def test_local_device_count(stdout):
    assert _lines(stdout)[0] == "local device count: 8"


def test_updated_shape(stdout):
    assert "updated shape: (8, 4)" in _lines(stdout)


def test_final_weights(stdout):
    text = _section(stdout, "final weights:", "weights after pairwise update:")

    weights = _numbers(text)

    np.testing.assert_array_equal(weights, np.arange(1.0, 33.0))
    assert text.count("\n") == 8  # printed as 8 rows


def test_weights_after_pairwise_update(stdout):
    text = _section(stdout, "weights after pairwise update:", "Array(")

    np.testing.assert_array_equal(_numbers(text), [2.0] * 4 + [0.0] * 4)
    assert text.strip().startswith("[[") and text.count("\n") == 2


def test_add_with_scale(arrays):
    values, kwargs = arrays[0]

    np.testing.assert_array_equal(values, np.arange(8) + 0.5)
    assert kwargs == "dtype=float32, weak_type=True"


def test_sample_normal_prints_eight_finite_numbers(arrays):
    values, kwargs = arrays[1]

    assert values.shape == (8,)
    assert all(math.isfinite(v) for v in values)
    assert kwargs == "dtype=float32"


def test_sample_shared(arrays):
    values, kwargs = arrays[2]

    np.testing.assert_allclose(values, SAMPLE_SHARED, rtol=0, atol=1e-5)
    assert kwargs == "dtype=float32"


def test_stateful_mapping_type(stdout):
    assert "<class 'statehost.transform.StatefulMapping'>" in _lines(stdout)


def test_origin_fun_repr(stdout):
    text = _section(stdout, "origin fun:", "state_in_axes:")

    assert text.lstrip().startswith("Affine(")
    assert "weight=ParamState(" in text
    assert "float32[2,4]" in text


def test_state_in_axes(stdout):
    assert "state_in_axes: {0: OfType(<class 'statehost.ParamState'>)}" in _lines(stdout)


def test_final_weight_value_after_custom_mapping(arrays):
    values, kwargs = arrays[3]

    np.testing.assert_array_equal(values, np.full(32, 2.0))
    assert kwargs == "dtype=float32"


def test_final_weight_value_is_printed_as_8_rows(stdout):
    last = stdout[stdout.rindex("Array(") :]

    assert last.count("[2., 2., 2., 2.]") == 8
