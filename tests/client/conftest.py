"""In-process fixtures: the real app and client without sockets (tests/inprocess.py)."""

from tests.inprocess import app, client, transport  # noqa: F401  (fixtures)
