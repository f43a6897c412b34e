"""``create_app(settings)``: the FastAPI application of ``statehost serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from statehost import __version__
from statehost.server.compile_cache import (
    CompileSources,
    compile_cache_dir,
    persistent_compile_cache,
)
from statehost.server.dashboard import DashboardLogins, MemoryHistory
from statehost.server.errors import install_handlers
from statehost.server.history import CallHistory
from statehost.server.openapi import install_openapi
from statehost.server.persistence import DamagedDatabaseError, flush, flusher
from statehost.server.routes import (
    call_control,
    calls,
    dashboard,
    docs,
    functions,
    health,
    info,
    jobs,
    metrics,
    namespaces,
    objects,
    sessions,
    states,
    stream,
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


class _RefusalWithoutTraceback:
    """A refusal to start (a damaged database) reaches the operator as its message alone.

    Starlette reports a lifespan that raised by sending its traceback as the failure
    message, which uvicorn prints; for a refusal the lifespan expects, the message (what is
    wrong and how to recover) is the whole story. It is in ``app.state.refused``.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_quietly(message: dict) -> None:
            refused = getattr(scope["app"].state, "refused", None)
            if message["type"] == "lifespan.startup.failed" and refused:
                message = {**message, "message": refused}
            await send(message)

        await self.app(scope, receive, send_quietly)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app; nothing is started until its lifespan runs (uvicorn does that).

    Arguments:
        settings: server settings; ``Settings.from_env()`` when omitted.

    Returns:
        A FastAPI application with every router, the error handlers and the lifespan.
    """
    settings = settings or Settings.from_env()
    runtime = Runtime(settings)
    sources = runtime.functions.programs.observer = CompileSources(runtime.metrics.compiles)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, runtime.persistence.open)
        except DamagedDatabaseError as exc:
            app.state.refused = str(exc)
            raise
        await loop.run_in_executor(None, runtime.persistence.reload, runtime.store)
        if runtime.group is not None:  # the followers reload the same (server/cluster.py)
            await loop.run_in_executor(None, runtime.group.share_data, runtime.persistence)
        await loop.run_in_executor(None, runtime.tokens.start)
        compiling = contextlib.ExitStack()  # JAX's configuration, process-wide: restored at exit
        compiling.enter_context(persistent_compile_cache(
            compile_cache_dir(settings.data_dir) if settings.compile_cache else None))
        sources.start()
        compiling.callback(sources.stop)
        tasks = [asyncio.create_task(_sweep(runtime)), asyncio.create_task(flusher(runtime))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Loops stop between steps (each step committed), so their workers are free.
            await jobs.stop_jobs(app.state.jobs, grace=min(5.0, settings.shutdown_grace))
            # uvicorn gave running calls the shutdown grace; those still running now are
            # abandoned (a thread cannot be stopped), so nothing here may wait for them.
            abandoned = runtime.scheduler.running
            if not abandoned:
                written = await flush(runtime)
            else:  # a job per state: the states an abandoned call holds must not block the rest
                pending = {asyncio.ensure_future(runtime.scheduler.run(
                    [i], runtime.persistence.flush, [i])) for i in runtime.persistence.dirty()}
                written = 0
                while pending:
                    done, pending = await asyncio.wait(pending, timeout=1.0)
                    written += sum(job.result() for job in done)
                    if not done and runtime.scheduler.running <= abandoned:
                        break  # no flush is writing: the rest wait on abandoned calls' locks
                log.warning("shutdown: %d call(s) still running; %d named state(s) they hold "
                            "keep their last flushed version", abandoned, len(pending))
            log.info("shutdown: flushed %d named state(s)", written)
            if not abandoned:
                runtime.scheduler.shutdown()  # waits for the pool's threads
            runtime.tokens.stop()
            runtime.persistence.close()
            compiling.close()

    # docs_url/redoc_url None: routes/docs.py serves both pages without a CDN.
    app = FastAPI(title="statehost", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.versions = local_versions()
    # Tells this server from another: a client that finds the advertised Unix socket checks
    # that the same server answers there (a loopback URL can be a tunnel to another host).
    app.state.instance = secrets.token_hex(8)
    app.state.jobs = jobs.table(runtime)
    app.state.call_history = runtime.scheduler.calls.history = CallHistory()
    app.state.dashboard_logins = DashboardLogins()
    app.state.memory_history = MemoryHistory()
    for module in (health, info, sessions, calls, call_control, stream, jobs, states, objects,
                   metrics, namespaces, values, functions, docs, dashboard):
        app.include_router(module.router)
    app.include_router(objects.frames)
    app.include_router(dashboard.pages)
    install_handlers(app)
    install_openapi(app)
    app.add_middleware(_RefusalWithoutTraceback)
    return app
