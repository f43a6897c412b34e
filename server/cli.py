"""The server's commands: ``statehost serve``, ``token create|list|revoke`` and ``repair``.

``serve`` starts the device-owning server and owns the process around it: flags read
from ``Settings`` (each names its ``STATEHOST_*`` variable), malloc tuning, signals, and
a shutdown that cannot hang on calls that never return. ``token`` manages the
per-namespace tokens the server accepts, stored hashed in its database; ``repair``
(``persistence/repair.py``) rebuilds that database from the state files. The
dispatcher (``statehost._cli``) imports this module when one of ``COMMANDS`` runs; the
client-side commands live in ``statehost.client._cli``. A new server command is one
entry in ``COMMANDS`` and one line in ``statehost._cli._COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from statehost._cli import Command
from statehost._config import token_path
from statehost.server.allocator import limit_malloc_arenas
from statehost.server.persistence.database import (
    SCOPES,
    DamagedDatabaseError,
    Database,
    hash_token,
)
from statehost.server.persistence.permissions import FILE_MODE, make_private_dir, tighten
from statehost.server.settings import (
    Settings,
    is_loopback,
    parse_size,
    parse_weight,
    resolve_data_dir,
)

__all__ = ["COMMANDS", "serve", "token_command"]

_MSG_INSECURE = (
    "statehost serve: refusing to listen on {host} (not loopback) with no tokens configured: "
    "anyone who can reach the port could run code on this machine. Fix it in one of these "
    "ways:\n"
    "  1. configure tokens: STATEHOST_TOKENS=<token>[,<token>...] or --token <token>;\n"
    "  2. listen on loopback only (--host 127.0.0.1) and reach it through an SSH tunnel;\n"
    "  3. pass --insecure to accept a generated token shown only on this console."
)
_MSG_ABANDONED = (
    "statehost serve: abandoned {count} call(s) still running {grace:g} s after the shutdown "
    "began (--shutdown-grace, STATEHOST_SHUTDOWN_GRACE); every named state they do not hold "
    "was flushed, the ones they hold keep their last flushed version. Exiting with status "
    "{status}."
)
_EXIT_ABANDONED = 4
_MSG_NO_DATABASE = (
    "statehost token {command}: no server database in {data_dir} ({source}); nothing was "
    "changed or created. A server keeps its tokens in <data dir>/statehost.db. Fix: name the "
    "data dir the server uses, as `statehost serve` was given it: --data-dir DIR or "
    "STATEHOST_DATA_DIR=DIR (its default is $XDG_DATA_HOME/statehost, else "
    "~/.local/share/statehost).{init}"
)
_MSG_INIT = (
    " To make tokens before the server's first start, add --init: it creates the database "
    "there."
)


# -- parsers ----------------------------------------------------------------------
class _Flag:
    """A ``serve`` flag that overrides one ``Settings`` field; its help names the field's
    variable and default, both read from ``Settings`` so they cannot drift."""

    def __init__(self, name: str, field: str, meaning: str, **kwargs: Any):
        self.name, self.field, self.meaning, self.kwargs = name, field, meaning, kwargs


_SERVE_FLAGS = (
    _Flag("--host", "host", "address to listen on; a non-loopback one needs tokens or "
          "--insecure"),
    _Flag("--port", "port", "port to listen on", type=int),
    _Flag("--cpu-devices", "cpu_devices", "virtual CPU devices when no accelerator is present",
          type=int),
    _Flag("--data-dir", "data_dir", "where the server keeps its files", type=Path),
    _Flag("--token", "tokens", "accept this bearer token; repeat the flag for more (the "
          "variable is comma-separated)", action="append", metavar="TOKEN"),
    _Flag("--insecure", "insecure", "allow a non-loopback --host without configured tokens",
          action="store_true", default=None),
    _Flag("--max-body", "max_body", "largest request body, as bytes or with a unit (512MiB)",
          type=parse_size),
    _Flag("--session-ttl", "session_ttl", "seconds before an idle session's states are freed",
          type=float),
    _Flag("--call-timeout", "call_timeout", "seconds a call that sets no timeout may wait "
          "and run: still queued then, it is dropped (never started); running, it is asked "
          "to stop at its next step (0: no default deadline)", type=float),
    _Flag("--session-workers", "session_workers", "the most workers one session's calls may "
          "hold at once; its other calls wait, holding no worker", type=int),
    _Flag("--dispatch-window", "dispatch_window", "the most programs the devices may still "
          "be running behind the server; the worker that dispatches one more waits for the "
          "oldest (XLA's CPU devices abort when a few dozen collective programs queue up)",
          type=int),
    _Flag("--device-memory", "device_memory", "memory per device that calls are admitted "
          "against where the platform reports none (CPU), as bytes or with a unit (8GiB)",
          type=parse_size),
    _Flag("--namespace-weight", "namespace_weights", "a namespace's weight in the fair "
          "scheduler, NAMESPACE=WEIGHT; repeat the flag for more", action="append",
          type=parse_weight, metavar="NS=WEIGHT"),
    _Flag("--shutdown-grace", "shutdown_grace", "seconds SIGTERM waits for running calls; "
          f"calls still running then are abandoned and the exit status is {_EXIT_ABANDONED}",
          type=float),
    _Flag("--unix", "unix", "a Unix socket to serve on besides TCP, for clients on this "
          "host (mode 0600): a path, auto ($XDG_RUNTIME_DIR/statehost/statehost.sock when "
          "$XDG_RUNTIME_DIR exists) or off", metavar="PATH"),
    _Flag("--default-max-bytes", "default_max_bytes", "quota of a namespace that sets none "
          "(statehost namespace set): bytes its states hold on all devices (8GiB)",
          type=parse_size),
    _Flag("--default-max-bytes-per-device", "default_max_bytes_per_device", "the same, on "
          "any one device (1GiB)", type=parse_size),
    _Flag("--default-max-sessions", "default_max_sessions", "the same: its open sessions",
          type=int),
    _Flag("--default-max-queued", "default_max_queued", "the same: its calls waiting in the "
          "queue", type=int),
    _Flag("--coordinator", "coordinator", "HOST:PORT of the jax.distributed coordinator of a "
          "group of server processes (process 0 runs it, on that port); with "
          "--num-processes and --process-id", metavar="HOST:PORT"),
    _Flag("--num-processes", "num_processes", "processes in the group", type=int),
    _Flag("--process-id", "process_id", "this process's index in the group: 0 leads and "
          "serves clients, the others follow and serve only GET /v1/health", type=int),
    _Flag("--cluster", "cluster", "auto: join the group jax.distributed.initialize() "
          "detects (SLURM, Kubernetes, TPU pods)", choices=["off", "auto"]),
    _Flag("--heartbeat-timeout", "heartbeat_timeout", "seconds without a follower's "
          "heartbeat before the leader holds it lost and refuses new work", type=float),
)


def _env(field: str) -> str:
    return f"STATEHOST_{field.upper()}"


def _default(field: dataclasses.Field[Any]) -> str:
    value = field.default
    if field.name == "tokens":
        return "none: one is generated at the first start and kept in the data dir"
    if field.name == "data_dir":
        return "$XDG_DATA_HOME/statehost, else ~/.local/share/statehost"
    if field.name == "session_workers":
        return "max(1, workers // 2)"
    if field.name == "device_memory":
        return "unset: no admission on devices that report no memory"
    if field.name == "namespace_weights":
        return f"none: every namespace weighs {Settings.namespace_weight}"
    if field.name in {"coordinator", "num_processes", "process_id"}:
        return "unset: one process, no group"
    if field.name.startswith("default_max_") and value is None:
        return "no limit"
    if isinstance(value, bool):
        return str(value).lower()
    if field.name == "max_body" and value % 2**30 == 0:
        return f"{value // 2**30}GiB"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for flag in _SERVE_FLAGS:
        field = fields[flag.field]
        parser.add_argument(flag.name, dest=flag.field, **flag.kwargs, help=(
            f"{flag.meaning} ({_env(field.name)}, default {_default(field)})"
        ).replace("%", "%%"))
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level (command line only, default info)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every request; costs about 0.15 ms per request (command "
                             "line only, default off)")
    flagged = {flag.field for flag in _SERVE_FLAGS}
    rest = ", ".join(f"{_env(f.name)} (default {_default(f)})"
                     for f in fields.values() if f.name not in flagged)
    parser.epilog = (f"Also read from the environment, with no flag: {rest}. A flag "
                     "overrides its variable.")


def _token_arguments(parser: argparse.ArgumentParser) -> None:
    data_dir = next(f for f in dataclasses.fields(Settings) if f.name == "data_dir")
    token_commands = parser.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser(
        "create", help="make a token for one namespace and scope; it is printed only once")
    create.add_argument("--namespace", required=True, help="the namespace the token acts on")
    create.add_argument("--scope", required=True, choices=SCOPES,
                        help="what it may do; each scope includes the ones before it")
    create.add_argument("--label", default="", help="a note shown by 'token list'")
    listing = token_commands.add_parser("list", help="show tokens (never the tokens themselves)")
    revoke = token_commands.add_parser("revoke", help="revoke tokens by hash prefix")
    revoke.add_argument("prefix", metavar="HASH_PREFIX",
                        help="start of the token's hash, as 'token list' shows it")
    create.add_argument("--init", action="store_true",
                        help="create the data dir's database if it has none, to make tokens "
                             "before the server's first start (without it, a data dir with "
                             "no database is refused, as a likely typo)")
    for sub in (create, listing, revoke):
        sub.add_argument("--data-dir", type=Path,
                         help=f"the server's data directory ({_env('data_dir')}, default "
                              f"{_default(data_dir)}); the command says which one it used "
                              "and refuses one with no database")


# -- token ------------------------------------------------------------------------
_HASH_SHOWN = 12
_MIN_PREFIX = 4


def _open_db(args: argparse.Namespace) -> tuple[Database | None, str]:
    """The server's database and a note naming it and where its data dir came from; no
    database (and nothing created) when the data dir has none, unless ``create --init``."""
    data_dir, source = resolve_data_dir(args.data_dir)
    path = data_dir / "statehost.db"
    if not path.is_file() and not getattr(args, "init", False):
        print(_MSG_NO_DATABASE.format(
            command=args.token_command, data_dir=data_dir, source=source,
            init=_MSG_INIT if args.token_command == "create" else ""), file=sys.stderr)
        return None, ""
    return Database(path), f"{path} (data dir from {source})"


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def token_command(args: argparse.Namespace) -> int:
    """Runs ``statehost token create|list|revoke`` on the server's database."""
    if args.token_command == "revoke":
        prefix = args.prefix.strip().lower()
        if len(prefix) < _MIN_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
            print(f"statehost token revoke: {args.prefix!r} is not a hash prefix. Fix: give at "
                  f"least {_MIN_PREFIX} hex digits of the hash shown by 'statehost token list'.",
                  file=sys.stderr)
            return 1
    try:
        db, where = _open_db(args)
    except DamagedDatabaseError as exc:
        print(f"statehost token {args.token_command}: {exc}", file=sys.stderr)
        return 1
    if db is None:
        return 1
    try:
        if args.token_command == "create":
            token = db.create_token(args.namespace, args.scope, args.label)
            print(f"statehost token create: {args.scope} token for namespace "
                  f"{args.namespace!r} (hash {hash_token(token)[:_HASH_SHOWN]}) in {where}. "
                  "It is shown only this once; store it now.", file=sys.stderr)
            print(token, flush=True)
            return 0
        if args.token_command == "list":
            rows = db.tokens()
            print(f"statehost token list: {'no ' if not rows else ''}tokens in {where}",
                  file=sys.stderr)
            if not rows:
                return 0
            table = [("HASH", "NAMESPACE", "SCOPE", "LABEL", "CREATED", "REVOKED")]
            table += [(r.hash[:_HASH_SHOWN], r.namespace, r.scope, r.label or "-",
                       _when(r.created), _when(r.revoked)) for r in rows]
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                print("  ".join(cells).rstrip())
            return 0
        if args.token_command == "revoke":
            matches = [r for r in db.tokens() if r.hash.startswith(prefix)]
            live = [r for r in matches if r.revoked is None]
            if len(live) > 1:
                print(f"statehost token revoke: {prefix!r} matches {len(live)} live tokens "
                      f"({', '.join(r.hash[:_HASH_SHOWN] for r in live)}). Fix: give a longer "
                      "prefix.", file=sys.stderr)
                return 1
            if not live:
                why = "is already revoked" if matches else "matches no token"
                print(f"statehost token revoke: {prefix!r} {why} in {where}. See "
                      "'statehost token list'.", file=sys.stderr)
                return 1
            db.revoke_token(live[0].hash)
            print(f"revoked {live[0].hash[:_HASH_SHOWN]} ({live[0].scope} on "
                  f"{live[0].namespace!r}) in {where}")
            return 0
    finally:
        db.close()
    raise AssertionError(args.token_command)


_GENERATED_TOKEN = "generated-token"


def _write_private(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically, mode 0600, in a 0700 folder."""
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _generated_token(data_dir: Path) -> tuple[str, bool]:
    """The token of a server started without tokens, and whether it was reused.

    It is kept with the server's files (``<data dir>/generated-token``, 0600), so a
    restart keeps it and clients that hold it go on; delete the file to get a new one.
    """
    path = data_dir / _GENERATED_TOKEN
    try:
        tighten(path, FILE_MODE)
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token, True
    token = secrets.token_urlsafe(32)
    _write_private(path, token + "\n")
    return token, False


def _write_token(token: str) -> Path:
    """The client's copy, where a client on this machine finds it (``token_path``)."""
    path = token_path()
    _write_private(path, token + "\n")
    return path


# -- serve ------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM/SIGINT; returns 0, or 2/3 when it cannot start.

    When calls are still running once the shutdown grace is over, it flushes what they
    do not hold and ends the process with status 4 (their threads cannot be stopped).
    """
    overrides = {flag.field: getattr(args, flag.field) for flag in _SERVE_FLAGS}
    overrides["tokens"] = tuple(args.tokens) if args.tokens else None
    settings = Settings.from_env(**overrides)
    # A group's followers serve only GET /v1/health: the check is the leader's (below).
    insecure = not settings.tokens and not is_loopback(settings.host) and not settings.insecure
    if insecure and not settings.in_group:
        print(_MSG_INSECURE.format(host=settings.host), file=sys.stderr)
        return 2

    if not settings.in_group:  # a group's data dir is not reloaded by one process
        from statehost.server.cluster import check_process_count

        refused = check_process_count(settings.data_dir, 1)
        if refused:
            print(refused, file=sys.stderr)
            return 2
    limit_malloc_arenas()  # before the backend starts its threads (server/allocator.py)
    # Must happen before any JAX backend starts; it only affects the CPU backend, so a
    # machine with accelerators keeps using them.
    import jax

    jax.config.update("jax_num_cpu_devices", settings.cpu_devices)
    group = None
    if settings.in_group:  # before JAX is otherwise used (server/cluster.py)
        from statehost.server import cluster

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        index, count = cluster.join(settings)
        if index > 0:
            from statehost.server.follower import serve_follower

            return serve_follower(settings, index, count)
        if insecure:
            print(_MSG_INSECURE.format(host=settings.host), file=sys.stderr)
            return 2
        refused = cluster.check_process_count(settings.data_dir, count)
        if refused:
            print(refused, file=sys.stderr)
            return 2
        group = cluster.Leader(settings, count)

    import uvicorn

    from statehost.server.app import create_app

    token_note = ""
    if not settings.tokens:
        token, reused = _generated_token(settings.data_dir)
        settings = Settings(**{**settings.__dict__, "tokens": (token,)})
        kept = settings.data_dir / _GENERATED_TOKEN
        how = f"token reused from {kept}" if reused else f"new token kept in {kept}"
        token_note = f" ({how}; also written to {_write_token(token)})"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    devices = jax.devices()
    kinds = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in devices}))
    shown = "localhost" if settings.host in {"0.0.0.0", "::"} else settings.host
    url = f"http://{shown}:{settings.port}"
    print(f"statehost serve: {len(devices)} device(s) [{kinds}] on {url}", flush=True)
    if token_note:
        print(f"  connect with: client = statehost.connect({url!r}, "
              f"token={settings.tokens[0]!r}){token_note}", flush=True)
    else:  # configured tokens are the operator's secrets: never echo them
        print(f"  connect with: client = statehost.connect({url!r}, token=<one of the "
              f"{len(settings.tokens)} configured token(s)>)", flush=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    if group is not None:
        runtime = app.state.runtime
        group.on_lost = runtime.scheduler.fail_all
        group.sent_bytes = runtime.metrics.cluster_broadcast_bytes
        runtime.group = group
        group.start()
        if not group.wait_formed():
            print(f"statehost serve: only {len(group.followers)} of {group.count - 1} "
                  "follower(s) joined; start every process of the group (--process-id 1.."
                  f"{group.count - 1}) with the same --coordinator.", file=sys.stderr)
            return 2
        print(f"  leader of a group of {group.count} processes", flush=True)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=args.log_level,
        access_log=args.access_log,
        # uvicorn waits this long for running requests (calls) after SIGTERM, then cancels
        # them; the app's lifespan then flushes without waiting for their threads.
        timeout_graceful_shutdown=settings.shutdown_grace,
        # The call stream (routes/stream.py): a frame per message. A little over the body
        # limit, so that a message just over it gets a readable 413 (stream.py) rather than
        # a closed socket; frames are mostly arrays, so no per-message deflate.
        ws="websockets-sansio", ws_max_size=settings.max_body + (1 << 20),
        ws_per_message_deflate=False,
    )
    server = _server_class(uvicorn)(config)
    sockets = _sockets(config, settings)
    app.state.unix_socket = None if sockets is None else sockets[1].getsockname()
    # Large array buffers by shared memory over the Unix socket, or why not (logged).
    from statehost.server.shared_memory import SharedMemory

    app.state.shared_memory = SharedMemory.start(
        settings, None if sockets is None else Path(app.state.unix_socket), app)
    try:
        server.run(sockets=sockets)
    finally:
        if group is not None:
            group.close()
        app.state.shared_memory.close()
        if sockets is not None:  # the socket file goes with the server that made it
            sockets[1].close()
            with contextlib.suppress(OSError):
                os.unlink(app.state.unix_socket)
    if not server.started:  # as uvicorn.run does: a lifespan that failed to start
        return 3
    abandoned = app.state.runtime.scheduler.running
    if abandoned:
        _exit_now(_MSG_ABANDONED.format(count=abandoned, grace=settings.shutdown_grace,
                                        status=_EXIT_ABANDONED), _EXIT_ABANDONED)
    return 0


def _sockets(config: Any, settings: Settings) -> list[Any] | None:
    """TCP and the Unix socket, when there is one (``None``: uvicorn binds TCP itself)."""
    from statehost.server import unix_socket

    path = unix_socket.socket_path(settings.unix)
    if path is None:
        return None
    try:
        unix = unix_socket.bind(path)
    except unix_socket.UnixSocketError as exc:
        if settings.unix != "auto":
            _exit_now(str(exc), 2)
        logging.getLogger("statehost.server").warning("%s (serving on TCP only)", exc)
        return None
    tcp = config.bind_socket()  # uvicorn's own: its messages when the port is taken
    print(f"  and on the Unix socket {path} (mode 0600; clients on this host use it)",
          flush=True)
    return [tcp, unix]


def _exit_now(message: str, status: int) -> None:
    """Ends the process now: a normal exit joins every worker thread (``concurrent.futures``
    registers that at exit), so threads stuck in calls that never return would keep it
    running forever."""
    print(message, file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(status)


def _server_class(uvicorn: Any) -> type:
    """``uvicorn.Server`` that exits normally after a graceful SIGTERM/SIGINT shutdown.

    uvicorn (0.29+, checked on 0.54) records the signals it caught and, once its
    graceful shutdown is over, re-raises them with ``signal.raise_signal`` after
    restoring the old handlers (see ``Server.capture_signals``), so the process
    dies *by* SIGTERM (exit status -15) although every running call finished and
    every dirty named state was flushed. A supervisor (systemd, Kubernetes, a
    test) then sees a crash. We install the same handler and restore the old
    ones, but do not re-raise: ``serve`` returns 0 (or 4, see ``serve``).
    """

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield  # signals can only be handled on the main thread
                return
            old = {sig: signal.signal(sig, self.handle_exit)
                   for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return Server


#: The commands ``statehost._cli`` dispatches here, by name.
def _repair_arguments(parser: argparse.ArgumentParser) -> None:
    # repair.py loads JAX (it rebuilds state values); only `statehost repair` needs it.
    from statehost.server.persistence.repair import repair_arguments

    repair_arguments(parser)


def _repair_command(args: argparse.Namespace) -> int:
    from statehost.server.persistence.repair import repair_command

    return repair_command(args)


COMMANDS: dict[str, Command] = {
    "serve": Command(_serve_arguments, serve),
    "token": Command(_token_arguments, token_command),
    "repair": Command(_repair_arguments, _repair_command),
}
