"""Where the local server's token lives, shared by ``statehost serve`` and the client."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["token_path"]


def token_path() -> Path:
    """``$XDG_CONFIG_HOME/statehost/token`` (``~/.config`` when the variable is unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "statehost" / "token"
