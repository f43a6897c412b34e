"""``statehost.connect``: the one door from the core to the client, opened lazily."""

from __future__ import annotations

from typing import Any

__all__ = ["connect"]


def connect(
    url: str = "http://127.0.0.1:8470",
    token: str | None = None,
    timeout: float = 60.0,
    **options: Any,
) -> Any:
    """Connects to a ``statehost serve``; see :func:`statehost.client.connect`.

    The client (and httpx) load only when this is called, so ``import
    statehost`` stays light and works without the client's dependencies.
    """
    try:
        from statehost.client import connect as client_connect
    except ImportError as exc:
        raise ImportError(
            f"statehost.connect needs the client's dependencies ({exc}). "
            "Fix: pip install 'statehost[client]'."
        ) from exc
    return client_connect(url, token, timeout, **options)
