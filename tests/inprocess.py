"""The real app and the real client, joined by an in-process transport (no sockets).

The fixtures here are imported by the conftest of tests/client and tests/server.
"""

import pytest

import statehost
from statehost.server import Settings, create_app
from statehost.server.testing import InProcessTransport
from tests.serving import metric_value

TOKEN = "in-process-token"
URL = "http://statehost.test"


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(tokens=(TOKEN,), max_body=64 * 2**20, data_dir=tmp_path / "data"))


@pytest.fixture
def transport(app):
    transport = InProcessTransport(app)
    yield transport
    transport.shutdown()


@pytest.fixture
def client(transport):
    """A client whose every call is a blocking round trip (``dispatch="sync"``): the tests
    that use it pin what happens at the call site. ``async_client`` is the default mode."""
    with statehost.connect(URL, token=TOKEN, transport=transport, dispatch="sync") as client:
        yield client


@pytest.fixture
def async_client(transport):
    """A client as ``statehost.connect`` makes one: warm calls return at once."""
    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        assert client.dispatch == "async"
        yield client


def metric(client, name, **labels):
    """The current value of a Prometheus sample (0.0 if it was never set)."""
    return metric_value(client._http.client.get("/metrics").text, name, **labels)
