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
    """No STATEHOST_* or XDG_DATA_HOME from the caller, and a HOME of the test's own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STATEHOST_") and k != "XDG_DATA_HOME"}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu",
                "HOME": str(tmp_path / "home"), **extra})
    return env


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _token(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "statehost.server", "token", *args],
        capture_output=True, text=True, timeout=60, env=env or _env(tmp_path),
    )


def _create(tmp_path, scope, label="", via_env=False):
    """A token made before the server's first start (``--init`` makes the database)."""
    data = str(tmp_path / "data")
    if via_env:
        result = _token(tmp_path, "create", "--namespace", "team", "--scope", scope,
                        "--label", label, "--init", env=_env(tmp_path, STATEHOST_DATA_DIR=data))
    else:
        result = _token(tmp_path, "create", "--namespace", "team", "--scope", scope,
                        "--label", label, "--init", "--data-dir", data)
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
    _create(tmp_path, "invoke", label="once")
    missing = _token(tmp_path, "revoke", "0000ffff", "--data-dir", data)
    assert missing.returncode == 1
    assert "matches no token" in missing.stderr

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


# -- which data dir, and never a new empty database ----------------------------------
def test_list_without_a_data_dir_refuses_the_empty_default_and_creates_nothing(tmp_path):
    """The server keeps its tokens in tmp/data; a bare `token list` looks in the default
    location, says so, and leaves it as it was (no empty database to mislead later)."""
    _create(tmp_path, "read", label="reader")
    listing = _token(tmp_path, "list")
    assert listing.returncode == 1
    default = tmp_path / "home" / ".local" / "share" / "statehost"
    assert f"no server database in {default}" in listing.stderr
    assert "the default, ~/.local/share/statehost" in listing.stderr
    assert "--data-dir" in listing.stderr and "STATEHOST_DATA_DIR" in listing.stderr
    assert listing.stdout == ""
    assert _files(tmp_path / "home") == []


@pytest.mark.parametrize("argv", [("list",), ("revoke", "abcd1234"),
                                  ("create", "--namespace", "team", "--scope", "read")])
def test_every_token_command_refuses_a_data_dir_without_a_database(tmp_path, argv):
    data = tmp_path / "typo"
    result = _token(tmp_path, *argv, "--data-dir", str(data))
    assert result.returncode == 1, result.stderr
    assert f"no server database in {data} (--data-dir)" in result.stderr
    assert not data.exists()
    if argv[0] == "create":
        assert "--init" in result.stderr  # how to make tokens before the first start


def test_token_commands_say_which_data_dir_they_used(tmp_path):
    _create(tmp_path, "read", label="reader")
    data = tmp_path / "data"
    before = _files(data)
    by_flag = _token(tmp_path, "list", "--data-dir", str(data))
    assert by_flag.returncode == 0, by_flag.stderr
    assert f"{data / 'statehost.db'} (data dir from --data-dir)" in by_flag.stderr
    assert " reader " in by_flag.stdout
    assert _files(data) == before  # a read-only command leaves no file behind
    by_env = _token(tmp_path, "list", env=_env(tmp_path, STATEHOST_DATA_DIR=str(data)))
    assert "(data dir from STATEHOST_DATA_DIR)" in by_env.stderr and " reader " in by_env.stdout

    created = _token(tmp_path, "create", "--namespace", "lab", "--scope", "read",
                     env=_env(tmp_path, XDG_DATA_HOME=str(tmp_path)))
    assert created.returncode == 1  # tmp/statehost has no database
    assert f"no server database in {tmp_path / 'statehost'} ($XDG_DATA_HOME/statehost)" \
        in created.stderr


def test_list_finds_the_tokens_of_a_server_on_its_default_data_dir(tmp_path):
    """Server and operator both follow XDG_DATA_HOME: no flag needed on either side."""
    env = _env(tmp_path, XDG_DATA_HOME=str(tmp_path / "share"))
    with running_server(tmp_path, env={"HOME": env["HOME"], "XDG_DATA_HOME": env["XDG_DATA_HOME"]},
                        data_dir_flag=False):
        made = _token(tmp_path, "create", "--namespace", "team", "--scope", "read",
                      "--label", "ops", env=env)
        assert made.returncode == 0, made.stderr
        listing = _token(tmp_path, "list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert " ops " in listing.stdout
    assert f"{tmp_path / 'share' / 'statehost' / 'statehost.db'}" in listing.stderr
