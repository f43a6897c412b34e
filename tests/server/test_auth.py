"""statehost.server.auth: token lookup never waits for SQLite on the event loop, and follows
tokens created and revoked by another process."""

import sqlite3
import threading
import time

import httpx

from statehost.server.auth import Principal, TokenTable
from statehost.server.persistence import Database
from tests.serving import running_server

LOCKED_FOR = 2.0


def _auth(token):
    return {"authorization": f"Bearer {token}"}


def _hold_lock(path, held, release_after):
    """``BEGIN EXCLUSIVE`` on a connection of its own, as another process's writer would."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(release_after)
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_health_and_auth_answer_while_another_process_locks_the_database(tmp_path):
    db_path = tmp_path / "data" / "statehost.db"
    db = Database(db_path)
    reader = db.create_token("team", "read")
    db.close()
    with running_server(tmp_path, env={"STATEHOST_FLUSH_INTERVAL": "3600"}) as served, \
            httpx.Client(base_url=served.url, timeout=30) as http:
        assert http.get("/v1/info", headers=_auth(reader)).status_code == 200

        held = threading.Event()
        locker = threading.Thread(target=_hold_lock, args=(db_path, held, LOCKED_FOR))
        locker.start()
        assert held.wait(10)
        # A server-side write now waits for the lock in a worker thread (a namespace
        # setting here; a flush or a first commit in a new namespace does the same).
        writer = threading.Thread(target=httpx.put, kwargs={
            "url": served.url + "/v1/namespaces/team", "json": {"durability": "sync"},
            "headers": _auth(served.token), "timeout": 30})
        writer.start()
        time.sleep(0.3)
        started = time.monotonic()
        timings = {}
        for path, headers in [("/v1/health", {}), ("/v1/info", _auth(reader))] * 3:
            t0 = time.perf_counter()
            response = http.get(path, headers=headers)
            timings.setdefault(path, []).append(time.perf_counter() - t0)
            assert response.status_code == 200, response.text
        still_locked = locker.is_alive() and time.monotonic() - started < LOCKED_FOR - 0.3
        locker.join()
        writer.join()
    # Far less than the lock is held: none of them waited for it (a bound loose enough for
    # a loaded 2-core machine; what it tells apart is 0.01 s from the LOCKED_FOR seconds).
    assert max(max(t) for t in timings.values()) < LOCKED_FOR / 4, timings
    assert still_locked, "the measurements must run while the database is locked"


def _eventually(predicate, within=1.0):
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {within} s"
        time.sleep(0.02)


def test_token_table_follows_another_connection_within_a_second(tmp_path):
    db = Database(tmp_path / "statehost.db")
    old = db.create_token("team", "read", "old")
    table = TokenTable(db.path)
    table.start()
    try:
        assert table.get(old) == Principal("team", "read", "old")
        assert table.get("sh_unknown") is None
        other = Database(db.path)  # another writer, as `statehost token create` is
        new = other.create_token("lab", "submit")
        _eventually(lambda: table.get(new) is not None)
        assert table.get(new).namespace == "lab" and table.get(new).label.startswith("token ")
        other.revoke_token(next(r.hash for r in other.tokens() if r.label == "old"))
        _eventually(lambda: table.get(old) is None)
        other.close()
    finally:
        table.stop()
        db.close()

