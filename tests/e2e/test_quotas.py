"""Quotas against a real ``statehost serve``: ``statehost namespace set/show`` round trips,
``statehost ls`` shows the ledger, ``serve --default-max-*`` applies, and a put past a
quota gets a 429 QuotaExceededError through the real client."""

import os
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import statehost
from statehost.client import QuotaExceededError
from tests.serving import running_server

STATEHOST = Path(sys.executable).with_name("statehost")  # the console script, as users run it


def _cli(tmp_path, served, *args, token=None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "cli-xdg"), "JAX_PLATFORMS": "cpu"})
    return subprocess.run(
        [str(STATEHOST), *args, "--url", served.url, "--token", token or served.token],
        capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("quotas"), "--default-max-queued", "9",
                        env={"STATEHOST_DEFAULT_MAX_SESSIONS": "50"}) as served:
        yield served


def test_namespace_set_and_show_round_trip(tmp_path, served):
    done = _cli(tmp_path, served, "namespace", "set", "team", "--max-bytes", "8KiB",
                "--max-bytes-per-device", "6KiB", "--max-sessions", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "team  (durability interval)"
    assert lines[1].split() == ["QUOTA", "IN", "EFFECT", "SET", "HERE", "USED"]
    assert lines[2].split() == ["max_bytes", "8.0", "KiB", "8.0", "KiB", "0", "B"]
    assert lines[3].split()[:5] == ["max_bytes_per_device", "6.0", "KiB", "6.0", "KiB"]
    assert lines[4].split()[:3] == ["max_sessions", "3", "3"]
    # --default-max-queued, as serve was started
    assert lines[5].split() == ["max_queued", "9", "(server", "default)", "0"]

    cleared = _cli(tmp_path, served, "namespace", "set", "team", "--max-sessions", "none")
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.splitlines()[4].split() == ["max_sessions", "50", "(server",
                                                      "default)", "0"]  # the env default
    shown = _cli(tmp_path, served, "namespace", "show", "team")
    assert shown.returncode == 0 and shown.stdout == cleared.stdout


def test_namespace_set_refuses_bad_values_and_tokens(tmp_path, served):
    bad = _cli(tmp_path, served, "namespace", "set", "team", "--max-bytes", "lots")
    assert bad.returncode == 2 and "'lots' is not a quota" in bad.stderr
    nothing = _cli(tmp_path, served, "namespace", "set", "team")
    assert nothing.returncode == 1 and "nothing to set" in nothing.stderr
    unknown = _cli(tmp_path, served, "namespace", "show", "nobody")
    assert unknown.returncode == 1 and "namespace 'nobody' is not visible" in unknown.stderr
    zero = _cli(tmp_path, served, "namespace", "set", "team", "--max-queued", "0")
    assert zero.returncode == 1
    assert "max_queued: Input should be greater than or equal to 1" in zero.stderr


def test_a_put_past_the_quota_is_refused_and_ls_shows_the_ledger(tmp_path, served):
    assert _cli(tmp_path, served, "namespace", "set", "shop", "--max-bytes",
                "6000").returncode == 0
    with statehost.connect(served.url, token=served.token) as client:
        client.put("shop/w", statehost.ParamState(jnp.ones(1000, jnp.float32)))
        with pytest.raises(QuotaExceededError, match=r"namespace 'shop' would exceed its quota "
                           r"max_bytes=5\.9 KiB \(6000 bytes\)") as info:
            client.put("shop/v", statehost.ParamState(jnp.ones(1000, jnp.float32)))
        assert info.value.status == 429 and "'shop/w' (3.9 KiB)" in str(info.value)
    listed = _cli(tmp_path, served, "ls", "shop")
    assert listed.returncode == 0, listed.stderr
    assert ("  on devices: 3.9 KiB (named 3.9 KiB, sessions 0 B); quotas: max_bytes 5.9 KiB, "
            "max_sessions 50, max_queued 9") in listed.stdout.splitlines()
    assert served.metric("statehost_ledger_bytes", namespace="shop", device="cpu:0") == 4000
