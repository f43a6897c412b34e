"""In-process fixtures: the real app and client without sockets (tests/inprocess.py)."""

from tests.inprocess import app, async_client, client, transport  # noqa: F401  (fixtures)
from tests.server.scheduling import gate, schedulers, server, sessions  # noqa: F401  (fixtures)
