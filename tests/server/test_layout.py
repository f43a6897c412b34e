"""Routes are thin: they decode, call a service, encode; no route touches State privates."""

import pathlib
import re

ROUTES = pathlib.Path(__file__).parents[2] / "server" / "routes"


def test_no_route_touches_state_privates_or_stand_in_sessions():
    offending = []
    for path in sorted(ROUTES.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\._(value|writes)\b|SimpleNamespace|__setstate__|__new__\(", line):
                offending.append(f"{path.name}:{number}: {line.strip()}")
    assert offending == []


def test_no_route_raises_an_error_by_status_and_string():
    for path in sorted(ROUTES.parent.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"ApiError\(\s*\d{3}", text), path
