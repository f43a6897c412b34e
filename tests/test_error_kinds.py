"""One table of error kinds (statehost.wire.ERROR_KINDS): the server raises a class per
kind with the kind's status, and the client raises a class per kind."""

import pytest

from statehost.client._errors import BY_TYPE, ClientError
from statehost.server.errors import ERROR_CLASSES, ApiError
from statehost.wire import ERROR_KINDS


def test_the_server_has_one_class_per_kind_with_its_status():
    assert set(ERROR_CLASSES) == set(ERROR_KINDS)
    for name, cls in ERROR_CLASSES.items():
        assert issubclass(cls, ApiError) and cls.type == name
        assert cls.status == ERROR_KINDS[name].status


def test_the_client_has_one_class_per_kind():
    assert set(BY_TYPE) == set(ERROR_KINDS)
    for name, cls in BY_TYPE.items():
        assert issubclass(cls, ClientError) and cls.__name__ == name


@pytest.mark.parametrize("name", sorted(ERROR_KINDS))
def test_every_kind_says_what_it_means(name):
    kind = ERROR_KINDS[name]
    assert 400 <= kind.status < 600 and kind.meaning


def test_a_server_error_answers_its_kind():
    from statehost.server.errors import StateNotFoundError

    exc = StateNotFoundError("POST /v1/call: no state 'x'.", missing=["x"])
    assert exc.status == 404
    assert exc.body() == {"error": {"type": "StateNotFoundError",
                                    "message": "POST /v1/call: no state 'x'.",
                                    "missing": ["x"]}}


def test_a_new_server_error_class_needs_a_kind_in_the_table():
    with pytest.raises(KeyError):
        type("MadeUpError", (ApiError,), {})
