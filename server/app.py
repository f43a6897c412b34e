"""``create_app(settings)``: the FastAPI application of ``statehost serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from statehost import __version__
from statehost.server.errors import install_handlers
from statehost.server.persistence import flush, flusher
from statehost.server.routes import (
    calls,
    functions,
    health,
    info,
    metrics,
    namespaces,
    objects,
    sessions,
    states,
    values,
)
from statehost.server.runtime import Runtime
from statehost.server.settings import Settings
from statehost.wire import local_versions

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
        await asyncio.get_running_loop().run_in_executor(None, runtime.persistence.reload,
                                                          runtime.store)
        tasks = [asyncio.create_task(_sweep(runtime)), asyncio.create_task(flusher(runtime))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            written = await flush(runtime)
            log.info("shutdown: flushed %d named state(s)", written)
            runtime.scheduler.shutdown()
            runtime.persistence.close()

    app = FastAPI(title="statehost", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.versions = local_versions()
    for module in (health, info, sessions, calls, states, objects, metrics, namespaces,
                   values, functions):
        app.include_router(module.router)
    app.include_router(objects.frames)
    install_handlers(app)
    return app
