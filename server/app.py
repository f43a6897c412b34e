"""``create_app(settings)``: the FastAPI application of ``statehost serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from statehost import __version__
from statehost.server.errors import install_handlers
from statehost.server.routes import calls, health, info, metrics, sessions, states
from statehost.server.runtime import Runtime
from statehost.server.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("statehost.server")


async def _sweep(rt: Runtime) -> None:
    """Frees sessions idle past their TTL."""
    period = min(60.0, max(0.05, rt.settings.session_ttl / 4))
    while True:
        await asyncio.sleep(period)
        rt.expire_sessions()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app; nothing is started until its lifespan runs (uvicorn does that).

    Arguments:
        settings: server settings; ``Settings.from_env()`` when omitted.

    Returns:
        A FastAPI application with every router, the error handlers and the lifespan.
    """
    settings = settings or Settings.from_env()
    runtime = Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep(runtime))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            runtime.scheduler.shutdown()

    app = FastAPI(title="statehost", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = runtime
    for module in (health, info, sessions, calls, states, metrics):
        app.include_router(module.router)
    install_handlers(app)
    return app
