"""Progress bars on transfers of 64 MiB or more, as a person at a terminal sees them.

Each case runs a real client process against a real server, with its stderr on a
pseudo-terminal (a bar shows only where a person sees it) or on a pipe.
"""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from tests.serving import running_server

SCRIPT = textwrap.dedent("""\
    import os, sys
    import jax.numpy as jnp
    import statehost
    progress = os.environ.get("ARG_PROGRESS", "1") == "1"
    with statehost.connect(os.environ["URL"], token=os.environ["TOKEN"],
                           progress=progress) as client:
        client.put("team/small", statehost.ParamState(jnp.ones((1024,))))
        client.get("team/small")
        print("SMALL-DONE", file=sys.stderr, flush=True)
        client.put("team/big", statehost.ParamState(jnp.ones((72 * 2**18,))))  # 72 MiB
        big = client.get("team/big")
        assert float(big.value.sum()) == 72 * 2**18
    print("CLIENT-OK", file=sys.stderr, flush=True)
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("progress")) as served:
        yield served


def _run(served, tmp_path, *, tty, env=None):
    """The client's stderr, as a terminal (``tty``) or a pipe would have received it."""
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    full = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    full.update({"URL": served.url, "TOKEN": served.token, "JAX_PLATFORMS": "cpu",
                 **(env or {})})
    if not tty:
        done = subprocess.run([sys.executable, str(script)], env=full, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return done.stderr
    leader, follower = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws a bar as wide as the screen.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, str(script)], env=full, stdout=subprocess.DEVNULL,
                            stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(240) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_sees_bars_for_large_transfers_only(served, tmp_path):
    out = _run(served, tmp_path, tty=True)
    assert "CLIENT-OK" in out
    small, _, large = out.partition("SMALL-DONE")
    assert "upload" not in small and "download" not in small
    assert "put upload" in large and "get download" in large
    assert "72.0M" in large  # the bar's total, in bytes with binary prefixes


@pytest.mark.parametrize("env", [{"STATEHOST_PROGRESS": "0"}, {"ARG_PROGRESS": "0"}],
                         ids=["STATEHOST_PROGRESS=0", "progress=False"])
def test_bars_turned_off(served, tmp_path, env):
    out = _run(served, tmp_path, tty=True, env=env)
    assert "CLIENT-OK" in out and "upload" not in out and "download" not in out


def test_no_bar_when_stderr_is_not_a_terminal(served, tmp_path):
    out = _run(served, tmp_path, tty=False)
    assert "CLIENT-OK" in out and "upload" not in out and "download" not in out
