"""A remote exception is caught by its original class: ``RemoteExecutionError(cls)``."""

import pickle

import jax.numpy as jnp
import pytest

import statehost.client
from statehost.client import RemoteExecutionError


class ImportableError(Exception):
    """A user's exception in an importable module: the client resolves it by name."""


class NeedsTwoArguments(Exception):
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


def _raiser(cls, *args):
    """A function raising ``cls(*args)``, built on the server (an exception like
    ``NeedsTwoArguments`` does not survive pickling, so it is not shipped made)."""

    def raises_it(x):
        raise cls(*args)

    return raises_it


@pytest.mark.parametrize("cls, args, caught_as", [
    (TypeError, ("bad operand",), TypeError),
    (ValueError, ("bad value",), ValueError),
    (KeyError, ("missing key",), LookupError),
    (ZeroDivisionError, ("by zero",), ArithmeticError),
    (FileNotFoundError, (2, "no such file", "/nowhere"), OSError),
    (UnicodeDecodeError, ("utf-8", b"\xff", 0, 1, "invalid start byte"), ValueError),
    (ImportableError, ("from a test module",), ImportableError),
    (NeedsTwoArguments, (7, "seven"), NeedsTwoArguments),
])
def test_a_remote_exception_is_caught_by_its_original_class(client, cls, args, caught_as):
    exc = cls(*args)
    with pytest.raises(caught_as) as info:
        client.jit(_raiser(cls, *args))(jnp.ones(2))
    error = info.value
    assert isinstance(error, RemoteExecutionError) and isinstance(error, type(exc))
    assert isinstance(error, statehost.client.ClientError)
    assert error.status == 422
    assert error.exception_type == type(exc).__qualname__
    assert error.exception_message == str(exc)
    # The message is statehost's (what raised, where), not a repr: KeyError's str quotes.
    assert f"the function raised {type(exc).__qualname__}: {exc}" in str(error)
    assert "raises_it" in error.remote_traceback and "raise cls(*args)" in error.remote_traceback
    assert error.remote_traceback in str(error)
    assert type(error).__name__ == f"RemoteExecutionError({type(exc).__qualname__})"


def test_the_original_message_and_traceback_survive_localization(client):
    def fails_on_purpose(x):
        return x + jnp.ones(3) @ jnp.ones(4)

    with pytest.raises(TypeError, match=r"the function raised TypeError: .*\(3,\).*\(4,\)") \
            as info:
        client.jit(fails_on_purpose)(1.0)
    assert __file__ in info.value.remote_traceback
    assert "fails_on_purpose" in info.value.remote_traceback


def test_an_unresolvable_class_falls_back_to_remote_execution_error(client):
    class DefinedInAFunction(Exception):
        pass

    with pytest.raises(RemoteExecutionError, match="DefinedInAFunction: local") as info:
        client.jit(_raiser(DefinedInAFunction, "local"))(jnp.ones(2))
    assert type(info.value) is RemoteExecutionError
    assert info.value.exception_type.endswith("<locals>.DefinedInAFunction")


def test_a_dual_error_pickles_as_itself(client):
    with pytest.raises(ValueError) as info:
        client.jit(_raiser(ValueError, "pickled"))(jnp.ones(2))
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, ValueError) and isinstance(again, RemoteExecutionError)
    assert str(again) == str(info.value) and again.status == 422
    assert again.remote_traceback == info.value.remote_traceback


@pytest.mark.parametrize("module, name", [
    ("no_such_module_here", "MissingError"),
    ("builtins", "NotAnExceptionName"),
    ("builtins", "len"),            # not a class
    ("builtins", "KeyboardInterrupt"),  # not an Exception: user code's errors are Exceptions
    ("statehost.client._errors", "AuthError"),  # one of the client's own: never doubled
])
def test_classes_that_do_not_resolve_give_the_plain_error(module, name):
    from statehost.client._errors import remote_execution_error

    error = remote_execution_error("POST /v1/call: the function raised X: y", status=422,
                                   body={"exception_type": name, "exception_module": module})
    assert type(error) is RemoteExecutionError
