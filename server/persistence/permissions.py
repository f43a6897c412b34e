"""File modes of the data directory: private to the user the server runs as.

State values and pickled functions are the users' data, and other local users of a shared
box must not read them: folders are ``0700`` and files ``0600``, whatever the umask. Folders
and files made by older versions (``0755`` / ``0644``) are tightened when the server opens
them, where this user owns them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "make_private_dir", "make_private_file", "tighten"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def tighten(path: Path, mode: int) -> None:
    """Drops every permission bit beyond ``mode`` from ``path``, if this user owns it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & ~mode:
        path.chmod(stat.S_IMODE(st.st_mode) & mode)


def make_private_dir(path: Path) -> None:
    """Creates ``path`` and its missing parents ``0700``; tightens ``path`` if it existed."""
    missing = []
    here = path
    while not here.exists():
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)  # umask only removes bits, so this is at most 0700
        except FileExistsError:  # made by a concurrent writer meanwhile
            pass
    tighten(path, DIR_MODE)


def make_private_file(path: Path) -> None:
    """Creates ``path`` empty with mode ``0600`` if missing; tightens it if it existed."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        tighten(path, FILE_MODE)
