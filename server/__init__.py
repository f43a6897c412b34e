"""statehost.server: the device-owning FastAPI server (``statehost serve``).

``create_app`` loads FastAPI on first use, so the ``statehost`` command's client-side
subcommands (``ls``, ``doctor``, ``checkpoint``, ``token``) start without it.
"""

from typing import Any

from statehost.server.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from statehost.server.app import create_app

        return create_app
    raise AttributeError(f"module 'statehost.server' has no attribute {name!r}")
