"""``TokenSource``: which bearer token the client sends, where it came from, and what to
say when the server refuses it.

A token is given (``token=``, ``--token``), taken from ``$STATEHOST_TOKEN``, or, for a
loopback URL, read from the local server's token file (``statehost._config.token_path``).
A server started without tokens keeps its generated token across restarts, but a new one
is made when its data dir is new; so a client whose token came from the file reads the
file again, once, when the server answers 401, and goes on with the new token. A given
token is never swapped for the file's (it may be a namespace token of a narrower scope);
the refusal then says when the file changed.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from statehost._config import token_path

__all__ = ["TokenSource"]


def is_local_url(url: str) -> bool:
    """A loopback URL, or a Unix socket's (``unix:///path``): a server on this host."""
    if url.startswith("unix://"):
        return True
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")


def _read(path: Path) -> tuple[str | None, float | None]:
    """The file's token and modification time, or ``(None, None)``."""
    try:
        return path.read_text().strip() or None, path.stat().st_mtime
    except OSError:
        return None, None


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


@dataclass
class TokenSource:
    """The token a client sends and where it came from.

    Arguments:
        token: the token sent, or ``None`` (no ``Authorization`` header).
        origin: ``"given"``, ``"STATEHOST_TOKEN"``, ``"file"`` or ``"none"``.
        path: the local server's token file, for a loopback URL (else ``None``).
        mtime: the file's modification time when its token was read (``origin="file"``).
    """

    token: str | None
    origin: str
    path: Path | None = None
    mtime: float | None = None

    @classmethod
    def find(cls, url: str, token: str | None = None) -> TokenSource:
        """As ``statehost.connect`` does: ``token``, else ``$STATEHOST_TOKEN``, else (for a
        loopback URL) the local server's token file."""
        path = token_path() if is_local_url(url) else None
        if token:
            return cls(token, "given", path)
        if os.environ.get("STATEHOST_TOKEN"):
            return cls(os.environ["STATEHOST_TOKEN"], "STATEHOST_TOKEN", path)
        if path is not None:
            found, mtime = _read(path)
            if found is not None:
                return cls(found, "file", path, mtime)
        return cls(None, "none", path)

    def reread(self) -> str | None:
        """After a 401: the file's token if this one came from (or could have come from)
        the file and the file now holds another; the source then uses it. Else ``None``."""
        if self.origin not in {"file", "none"} or self.path is None:
            return None
        found, mtime = _read(self.path)
        if found is None or found == self.token:
            return None
        self.token, self.origin, self.mtime = found, "file", mtime
        return found

    def refusal(self, reread: bool) -> str:
        """What a 401 adds to its message: where this token came from, and whether (and
        when) the local server's token file changed. ``reread``: the token was just
        re-read from the file, and the server refused that one too."""
        if self.path is None:
            return ""
        found, mtime = _read(self.path)
        if self.origin == "file" and found == self.token:
            written = f"written at {_when(mtime)}" if mtime is not None else "since removed"
            again = " (re-read after a first refusal)" if reread else ""
            return (f" This client's token was read from {self.path}{again} ({written}), which "
                    "this server does not accept: it was started with tokens of its own "
                    "(STATEHOST_TOKENS or --token), or it is not the server that wrote that "
                    "file (another --data-dir or XDG_CONFIG_HOME).")
        if found is not None and found != self.token and mtime is not None:
            how = ("statehost.connect(url) without token= reads it" if self.origin == "given"
                   else "unset STATEHOST_TOKEN to use it")
            return (f" The local server's token file {self.path} holds a different token, "
                    f"written at {_when(mtime)}: the server's token changed then (a server "
                    f"started without tokens on a new data dir makes a new one); {how}.")
        return ""
