"""The ``statehost`` command.

``statehost serve`` starts the device-owning server; ``statehost token create|list|revoke``
manages the per-namespace tokens it accepts (stored hashed in the server's database);
``statehost ls``, ``doctor`` and ``checkpoint`` look at and act on a running server over
HTTP (they load the client, never FastAPI).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from statehost._config import token_path
from statehost.server.persistence.database import SCOPES, Database, hash_token
from statehost.server.settings import Settings, is_loopback, parse_size

__all__ = ["main"]

_MSG_INSECURE = (
    "statehost serve: refusing to listen on {host} (not loopback) with no tokens configured: "
    "anyone who can reach the port could run code on this machine. Fix it in one of these "
    "ways:\n"
    "  1. configure tokens: STATEHOST_TOKENS=<token>[,<token>...] or --token <token>;\n"
    "  2. listen on loopback only (--host 127.0.0.1) and reach it through an SSH tunnel;\n"
    "  3. pass --insecure to accept a generated token shown only on this console."
)
_MSG_NO_TOKEN = (
    "no token was sent. Fix: pass --token <token>, set STATEHOST_TOKEN, or run this on the "
    "server's machine (it reads $XDG_CONFIG_HOME/statehost/token); an operator makes one with "
    "`statehost token create --namespace <ns> --scope <scope>`."
)
_MSG_BAD_TOKEN = (
    "the token is not accepted by this server. Fix: use the token the server printed at "
    "start, one from its STATEHOST_TOKENS, or one made with `statehost token create` (and "
    "not revoked: see `statehost token list`)."
)
_MSG_UNREACHABLE = (
    "cannot connect to {url} ({why}). Is `statehost serve` running there? Start it with "
    "`statehost serve`, or check the URL and port."
)
_DEFAULT_URL = f"http://127.0.0.1:{Settings.port}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statehost", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the server that owns this machine's devices")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8470)")
    serve.add_argument("--cpu-devices", type=int,
                       help="virtual CPU devices when no accelerator is present (default 8)")
    serve.add_argument("--data-dir", type=Path, help="where the server keeps its files")
    serve.add_argument("--token", action="append", dest="tokens",
                       help="accept this bearer token (repeatable; default: generate one)")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="allow a non-loopback --host without configured tokens")
    serve.add_argument("--max-body", type=parse_size, help="largest request body (default 4GiB)")
    serve.add_argument("--session-ttl", type=float,
                       help="seconds before an idle session's states are freed (default 3600)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true",
                       help="log every request (costs about 0.15 ms per request)")

    token = commands.add_parser("token", help="create, list or revoke namespace tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
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
    for sub in (create, listing, revoke):
        sub.add_argument("--data-dir", type=Path,
                         help="the server's data directory (default: STATEHOST_DATA_DIR or "
                              "~/.local/share/statehost)")

    ls = commands.add_parser("ls", help="list a running server's namespaces, objects and states")
    doctor = commands.add_parser(
        "doctor", help="check that this client and a running server can work together")
    checkpoint = commands.add_parser(
        "checkpoint", help="write named states to the server's disk now")
    for sub in (ls, doctor, checkpoint):
        sub.add_argument("url", nargs="?", default=_DEFAULT_URL, metavar="URL",
                         help=f"the server (default {_DEFAULT_URL})")
    checkpoint.add_argument("name", nargs="?", metavar="NAME",
                            help="'namespace/object' or a whole 'namespace' (default: every "
                                 "namespace the token can see)")
    for sub in (ls, doctor, checkpoint):
        sub.add_argument("--token", help="bearer token (default: $STATEHOST_TOKEN, or the "
                                         "local server's token file for a loopback URL)")
        sub.add_argument("--timeout", type=float, default=30.0,
                         help="seconds to wait for the server (default 30)")
    return parser


_HASH_SHOWN = 12
_MIN_PREFIX = 4


def _open_db(args: argparse.Namespace) -> Database:
    return Database(Settings.from_env(data_dir=args.data_dir).data_dir / "statehost.db")


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def token_command(args: argparse.Namespace) -> int:
    if args.token_command == "revoke":
        prefix = args.prefix.strip().lower()
        if len(prefix) < _MIN_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
            print(f"statehost token revoke: {args.prefix!r} is not a hash prefix. Fix: give at "
                  f"least {_MIN_PREFIX} hex digits of the hash shown by 'statehost token list'.",
                  file=sys.stderr)
            return 1
    db = _open_db(args)
    try:
        if args.token_command == "create":
            token = db.create_token(args.namespace, args.scope, args.label)
            print(f"statehost token create: {args.scope} token for namespace "
                  f"{args.namespace!r} (hash {hash_token(token)[:_HASH_SHOWN]}) in {db.path}. "
                  "It is shown only this once; store it now.", file=sys.stderr)
            print(token, flush=True)
            return 0
        if args.token_command == "list":
            rows = db.tokens()
            if not rows:
                print(f"no tokens in {db.path}", file=sys.stderr)
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
                print(f"statehost token revoke: {prefix!r} {why} in {db.path}. See "
                      "'statehost token list'.", file=sys.stderr)
                return 1
            db.revoke_token(live[0].hash)
            print(f"revoked {live[0].hash[:_HASH_SHOWN]} ({live[0].scope} on "
                  f"{live[0].namespace!r})")
            return 0
    finally:
        db.close()
    raise AssertionError(args.token_command)


def _write_token(token: str) -> Path:
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".token.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return path


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's per-thread malloc arenas (as MALLOC_ARENA_MAX would).

    Device work runs on several threads; with one arena per thread, each call's
    fresh multi-MiB output lands in memory that must be page-faulted in again
    instead of reusing what the previous call freed. A 128 MiB resident step took
    about twice as long on the server as locally; with 2 arenas it matches. Must
    run before the backend starts its threads; a no-op off glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX from malloc.h
    except (OSError, AttributeError):
        pass


# -- ls, doctor, checkpoint: a running server, over HTTP -----------------------------
def _remote(args: argparse.Namespace) -> Any:
    """A JSON connection to the server without a session: these commands ship no pickles,
    so they work even where versions differ (``doctor`` is the one that reports that)."""
    from statehost.client._client import _token_for
    from statehost.client._http import Http

    return Http(args.url, args.token or _token_for(args.url), args.timeout, None)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError(n)


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _leaves(leaves: list[dict[str, Any]]) -> str:
    return ", ".join(f"{leaf['dtype']}{leaf['shape']}" for leaf in leaves) or "-"


def _client_errors() -> tuple[type[Exception], ...]:
    from statehost.client import ClientError

    return (ClientError,)


def _fail(command: str, exc: Exception) -> int:
    first = str(exc).split("\n\nRemote traceback:")[0].strip()
    print(f"statehost {command}: {first}", file=sys.stderr)
    return 1


def ls(args: argparse.Namespace) -> int:
    """Prints every namespace the token can read, with its objects and states."""
    try:
        http = _remote(args)
        try:
            namespaces = http.json("GET", "/v1/namespaces")["namespaces"]
            listed = [(ns, http.json("GET", f"/v1/namespaces/{ns['name']}/objects")["objects"])
                      for ns in namespaces]
        finally:
            http.close()
    except _client_errors() as exc:
        return _fail("ls", exc)
    if not listed:
        print(f"no namespaces visible on {args.url}")
        return 0
    for ns, objects in listed:
        print(f"{ns['name']}  (durability {ns['durability']}, {len(objects)} object(s), "
              f"{_size(ns['resident_bytes'])} resident)")
        rows = [("OBJECT", "STATE", "KIND", "LEAVES", "BYTES", "VERSION", "DURABLE", "STATUS")]
        for obj in objects:
            for st in obj["states"] or [{}]:
                rows.append((obj["name"], st.get("name", "-"), st.get("kind", "-"),
                             _leaves(st.get("leaves", [])), _size(st.get("bytes")),
                             str(st.get("version", "-")), str(st.get("durable_version", "-")),
                             st.get("status", "-")))
        if len(rows) > 1:
            _table(rows, "  ")
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Compares this client with the server and says what the server would refuse, and why."""
    from statehost.client import AuthError, TransportError
    from statehost.wire import local_versions, version_problems

    mine = local_versions()
    print(f"statehost doctor: {args.url}")
    try:
        http = _remote(args)
    except _client_errors() as exc:
        return _fail("doctor", exc)
    token_sent = "authorization" in http.client.headers
    try:
        info = http.json("GET", "/v1/info")
    except TransportError as exc:
        why = str(exc.__cause__ or exc)
        print(f"  PROBLEM  {_MSG_UNREACHABLE.format(url=args.url, why=why)}")
        return 1
    except AuthError:
        print(f"  PROBLEM  {_MSG_BAD_TOKEN if token_sent else _MSG_NO_TOKEN}")
        rows = [("VERSION", "CLIENT")] + [(k, str(v)) for k, v in mine.items()]
        _table(rows, "  ")
        return 1
    except _client_errors() as exc:
        return _fail("doctor", exc)
    finally:
        http.close()

    theirs = info.get("versions", {})
    problems = version_problems(mine, theirs, me="client", them="server")
    rows = [("VERSION", "CLIENT", "SERVER", "")]
    for key in dict.fromkeys([*mine, *theirs]):
        a, b = str(mine.get(key, "unknown")), str(theirs.get(key, "unknown"))
        bad = any(p.startswith(f"{key}:") for p in problems)
        rows.append((key, a, b, "MISMATCH" if bad else "OK" if a == b else "OK (compatible)"))
    print("  server reachable, token accepted")
    _table(rows, "  ")
    devices = info.get("devices", [])
    kinds: dict[str, list[int]] = {}
    for d in devices:
        kinds.setdefault(f"{d['platform']}:{d['kind']}", []).append(d["id"])
    shown = "; ".join(f"{len(ids)} x {kind} (ids {', '.join(map(str, ids))})"
                      for kind, ids in kinds.items())
    print(f"  devices: {len(devices)}: {shown or 'none'}")
    limits = info.get("limits", {})
    print(f"  limits: max_body {_size(limits.get('max_body'))}, "
          f"session_ttl {limits.get('session_ttl', float('nan')):g} s")
    if problems:
        print("  REFUSED: calls and put/get ship pickles, and the server refuses them "
              "because these versions differ:")
        for line in problems:
            print(f"    - {line}")
        print("  Fix: install the server's versions in this environment (or the other way "
              "round).")
        return 1
    print("  all good: this client can run calls on this server")
    return 0


def checkpoint(args: argparse.Namespace) -> int:
    """Flushes ``ns/name``, a namespace, or every visible namespace to disk."""
    try:
        http = _remote(args)
        try:
            if args.name:
                targets = [args.name]
            else:
                targets = [ns["name"] for ns in http.json("GET", "/v1/namespaces")["namespaces"]]
            total = 0
            for target in targets:
                namespace, _, obj = target.partition("/")
                params = {"name": obj} if obj else {}
                flushed = http.json("POST", f"/v1/namespaces/{namespace}/checkpoint",
                                    params=params)["flushed"]
                total += flushed
                print(f"{target}: flushed {flushed} state(s)")
        finally:
            http.close()
    except _client_errors() as exc:
        return _fail("checkpoint", exc)
    print(f"flushed {total} state(s) in {len(targets)} target(s)")
    return 0


# -- serve ------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        host=args.host, port=args.port, cpu_devices=args.cpu_devices, data_dir=args.data_dir,
        tokens=tuple(args.tokens) if args.tokens else None, insecure=args.insecure,
        max_body=args.max_body, session_ttl=args.session_ttl,
    )
    if not settings.tokens and not is_loopback(settings.host) and not settings.insecure:
        print(_MSG_INSECURE.format(host=settings.host), file=sys.stderr)
        return 2

    _limit_malloc_arenas()
    # Must happen before any JAX backend starts; it only affects the CPU backend, so a
    # machine with accelerators keeps using them.
    import jax

    jax.config.update("jax_num_cpu_devices", settings.cpu_devices)

    import uvicorn

    from statehost.server.app import create_app

    token_note = ""
    if not settings.tokens:
        token = secrets.token_urlsafe(32)
        settings = Settings(**{**settings.__dict__, "tokens": (token,)})
        token_note = f" (token also written to {_write_token(token)})"
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
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port,
        log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=30,
    )
    server = _server_class(uvicorn)(config)
    server.run()
    # As uvicorn.run does: a lifespan that failed to start leaves the server unstarted.
    return 0 if server.started else 3


def _server_class(uvicorn: Any) -> type:
    """``uvicorn.Server`` that exits normally after a graceful SIGTERM/SIGINT shutdown.

    uvicorn (0.29+, checked on 0.54) records the signals it caught and, once its
    graceful shutdown is over, re-raises them with ``signal.raise_signal`` after
    restoring the old handlers (see ``Server.capture_signals``), so the process
    dies *by* SIGTERM (exit status -15) although every running call finished and
    every dirty named state was flushed. A supervisor (systemd, Kubernetes, a
    test) then sees a crash. We install the same handler and restore the old
    ones, but do not re-raise: ``serve`` returns 0.
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "token":
        return token_command(args)
    if args.command == "ls":
        return ls(args)
    if args.command == "doctor":
        return doctor(args)
    if args.command == "checkpoint":
        return checkpoint(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
