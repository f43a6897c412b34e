"""The Unix socket ``statehost serve`` listens on besides TCP, for clients on the same host.

``--unix PATH`` (``STATEHOST_UNIX``) names it; ``auto``, the default, means
``$XDG_RUNTIME_DIR/statehost/statehost.sock`` when ``$XDG_RUNTIME_DIR`` exists (a
per-user directory on systemd hosts), and none otherwise; ``off`` turns it off. The
socket is the owner's only (mode 0600, in a directory of mode 0700 the server makes, or
one already private to this user): the file mode is a second fence, and tokens are still
required on it. A socket file left by a server that was killed is replaced; one that a
live server answers on is not (``auto`` then goes without, a named path is refused).

``/v1/info`` advertises the path, so a client given a loopback URL switches to it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = ["UnixSocketError", "bind", "socket_path"]

log = logging.getLogger("statehost.server")

_MSG_NOT_PRIVATE = (
    "statehost serve: the Unix socket's directory {dir} is {what}; a socket there would "
    "not be this user's only. Fix: name another path with --unix PATH (its directory is "
    "made with mode 0700 if missing), or --unix off."
)
_MSG_IN_USE = (
    "statehost serve: another server already answers on the Unix socket {path}. Fix: stop "
    "it, or name another path with --unix PATH (or --unix off)."
)
_MSG_TOO_LONG = (
    "statehost serve: the Unix socket path {path} is {n} bytes long; the system allows "
    "at most 107. Fix: name a shorter path with --unix PATH."
)


class UnixSocketError(RuntimeError):
    """The Unix socket cannot be made (the message says why and what to do)."""


def socket_path(setting: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The socket path for ``setting`` (a path, ``auto`` or ``off``), or ``None``."""
    env = os.environ if env is None else env
    if setting in ("", "off"):
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.path.isabs(runtime) or not os.path.isdir(runtime):
        return None
    return Path(runtime) / "statehost" / "statehost.sock"


def _private_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        return
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnixSocketError(_MSG_NOT_PRIVATE.format(dir=directory, what="not a directory"))
    if info.st_uid != os.getuid():
        raise UnixSocketError(_MSG_NOT_PRIVATE.format(dir=directory,
                                                      what=f"owned by uid {info.st_uid}"))
    if info.st_mode & 0o077:
        raise UnixSocketError(_MSG_NOT_PRIVATE.format(
            dir=directory, what=f"open to others (mode {stat.S_IMODE(info.st_mode):o})"))


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0600, in a private directory.

    Raises:
        UnixSocketError: the directory is not private, the path is too long, or a live
            server answers there.
    """
    if len(os.fsencode(path)) > 107:
        raise UnixSocketError(_MSG_TOO_LONG.format(path=path, n=len(os.fsencode(path))))
    _private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if _is_live(path):
            raise UnixSocketError(_MSG_IN_USE.format(path=path))
        path.unlink()  # left by a server that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600: no moment when others may connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UnixSocketError(_MSG_IN_USE.format(path=path)) from exc
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
