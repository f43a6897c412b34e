"""Disk failures: ``StorageError`` (503, from ``server/errors.py``: a call refused or not
applied because the server cannot write its disk) and how to describe one without paths.

A ``StorageError``'s message says that nothing was applied and why (``No space left on
device``, ...), and never names a server path: callers see it, operators find the path
in the server log.
"""

from __future__ import annotations

import os
import sqlite3

from statehost.server.errors import StorageError

__all__ = ["StorageError", "describe_failure"]


def describe_failure(exc: BaseException) -> str:
    """Why a disk write failed, without the file names ``str(OSError)`` carries."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    if isinstance(exc, sqlite3.Error):
        return f"the metadata database: {exc}"  # SQLite's messages name no files
    return type(exc).__name__
