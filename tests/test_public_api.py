"""The public namespaces: every ``__all__`` is sorted and complete."""

import importlib
import types

import pytest

NAMESPACES = [
    "statehost",
    "statehost.nn",
    "statehost.random",
    "statehost.transform",
    "statehost.util",
    "statehost.util.filter",
]


def _public_names(module):
    """Names a module binds that do not start with ``_``, split into (modules, others)."""
    public = {name: value for name, value in vars(module).items() if not name.startswith("_")}
    modules = {name for name, value in public.items() if isinstance(value, types.ModuleType)}
    return modules, set(public) - modules


@pytest.mark.parametrize("name", NAMESPACES)
def test_all_is_sorted_and_without_duplicates(name):
    module = importlib.import_module(name)

    assert list(module.__all__) == sorted(module.__all__)
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("name", NAMESPACES)
def test_all_lists_every_public_name(name):
    module = importlib.import_module(name)
    _, others = _public_names(module)

    assert others - set(module.__all__) == set()


@pytest.mark.parametrize("name", NAMESPACES)
def test_every_name_in_all_exists(name):
    module = importlib.import_module(name)

    missing = [item for item in module.__all__ if not hasattr(module, item)]

    assert missing == []


@pytest.mark.parametrize("name", NAMESPACES)
def test_star_import_gives_exactly_all(name):
    namespace: dict = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - the behaviour under test

    assert set(namespace) - {"__builtins__"} == set(importlib.import_module(name).__all__)


def test_statehost_all_holds_the_core_api():
    import statehost

    assert {
        "BatchAxisError",
        "HiddenState",
        "LongTermState",
        "ParamState",
        "ShortTermState",
        "State",
        "StateTraceError",
        "StatehostError",
        "clear_caches",
        "nn",
        "random",
        "transform",
        "util",
    } <= set(statehost.__all__)


def test_public_subpackages_are_listed_in_statehost_all():
    import statehost

    modules, _ = _public_names(statehost)

    assert {"nn", "random", "transform", "util"} <= modules
    # client, server and the wire they share load on demand, never with `import statehost`.
    assert modules <= set(statehost.__all__) | {"client", "server", "wire"}


@pytest.mark.parametrize(
    "path",
    [
        "statehost.ParamState",
        "statehost.nn.Module",
        "statehost.random.RandomState",
        "statehost.util.filter.OfType",
        "statehost.transform.pmap",
        "statehost.transform.vmap",
        "statehost.transform.jit",
        "statehost.transform.StatefulMapping",
    ],
)
def test_seed_import_paths(path):
    module_name, _, attr = path.rpartition(".")

    assert hasattr(importlib.import_module(module_name), attr)


def test_version_is_the_distribution_version():
    from importlib.metadata import version

    import statehost

    assert statehost.__version__ == version("statehost")


@pytest.mark.parametrize("name", [*NAMESPACES, "statehost.client", "statehost.wire"])
def test_every_name_in_all_resolves(name):
    """Names load lazily (statehost/_lazy.py): each one must still be there when asked for."""
    module = importlib.import_module(name)
    for attr in module.__all__:
        assert getattr(module, attr) is not None, attr
    assert set(module.__all__) <= set(dir(module))


def test_importing_statehost_starts_no_jax():
    import subprocess
    import sys

    code = ("import sys, statehost, statehost.client, statehost.wire; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
