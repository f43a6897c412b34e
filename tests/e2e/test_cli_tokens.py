"""``statehost token create|list|revoke`` as an operator runs them, against a real server."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.serving import running_server

FRAME = {"content-type": "application/vnd.statehost.frame"}


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu", **extra})
    return env


def _token(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "statehost.server", "token", *args],
        capture_output=True, text=True, timeout=60, env=env or _env(tmp_path),
    )


def _create(tmp_path, scope, label="", via_env=False):
    data = str(tmp_path / "data")
    if via_env:
        result = _token(tmp_path, "create", "--namespace", "team", "--scope", scope,
                        "--label", label, env=_env(tmp_path, STATEHOST_DATA_DIR=data))
    else:
        result = _token(tmp_path, "create", "--namespace", "team", "--scope", scope,
                        "--label", label, "--data-dir", data)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("sh_") and token not in result.stderr
    assert "only" in result.stderr
    return token


def _auth(token):
    return {"authorization": f"Bearer {token}"}


def _hash_prefix(listing, label):
    lines = [line for line in listing.splitlines() if f" {label} " in line]
    assert len(lines) == 1, listing
    return lines[0].split()[0]


def test_token_lifecycle_against_a_real_server(tmp_path):
    data = str(tmp_path / "data")
    reader = _create(tmp_path, "read", label="reader")
    submitter = _create(tmp_path, "submit", label="submitter", via_env=True)
    doomed = _create(tmp_path, "admin", label="doomed")

    listing = _token(tmp_path, "list", "--data-dir", data)
    assert listing.returncode == 0, listing.stderr
    for token in (reader, submitter, doomed):
        assert token not in listing.stdout
        assert token[3:20] not in listing.stdout
    assert "team" in listing.stdout and "read" in listing.stdout
    doomed_prefix = _hash_prefix(listing.stdout, "doomed")

    with running_server(tmp_path) as served:
        with httpx.Client(base_url=served.url, timeout=30) as http:
            for token in (reader, submitter, doomed):
                assert http.get("/v1/info", headers=_auth(token)).status_code == 200
            assert http.get("/v1/info", headers=_auth("sh_not-a-token")).status_code == 401

            # Binary routes take code: a read token is refused before the body is looked at.
            denied = http.post("/v1/call", content=b"\0" * 16, headers={**FRAME, **_auth(reader)})
            assert denied.status_code == 403, denied.text
            allowed = http.post("/v1/call", content=b"\0" * 16,
                                headers={**FRAME, **_auth(submitter)})
            assert allowed.status_code not in (401, 403), allowed.text

            # Revoked while the server runs: refused within a second (the server polls).
            revoked = _token(tmp_path, "revoke", doomed_prefix, "--data-dir", data)
            assert revoked.returncode == 0, revoked.stderr
            deadline = time.monotonic() + 1.5
            while http.get("/v1/info", headers=_auth(doomed)).status_code != 401:
                assert time.monotonic() < deadline, "a revoked token still works"
                time.sleep(0.05)
            assert http.get("/v1/info", headers=_auth(reader)).status_code == 200

    listing = _token(tmp_path, "list", "--data-dir", data).stdout
    doomed_line = next(line for line in listing.splitlines() if " doomed " in line)
    assert doomed_line.split()[-1] != "-"  # revoked timestamp shown
    reader_line = next(line for line in listing.splitlines() if " reader " in line)
    assert reader_line.split()[-1] == "-"


def test_revoke_unknown_or_revoked_prefix_fails_clearly(tmp_path):
    data = str(tmp_path / "data")
    missing = _token(tmp_path, "revoke", "0000ffff", "--data-dir", data)
    assert missing.returncode == 1
    assert "matches no token" in missing.stderr

    _create(tmp_path, "invoke", label="once")
    prefix = _hash_prefix(_token(tmp_path, "list", "--data-dir", data).stdout, "once")
    assert _token(tmp_path, "revoke", prefix, "--data-dir", data).returncode == 0
    again = _token(tmp_path, "revoke", prefix, "--data-dir", data)
    assert again.returncode == 1
    assert "already revoked" in again.stderr

    bad = _token(tmp_path, "revoke", "not-hex", "--data-dir", data)
    assert bad.returncode == 1
    assert "hash prefix" in bad.stderr


@pytest.mark.parametrize("scope", ["owner", ""])
def test_bad_scope_is_rejected_by_argparse(tmp_path, scope):
    result = _token(tmp_path, "create", "--namespace", "team", "--scope", scope,
                    "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert not (tmp_path / "data" / "statehost.db").exists()
