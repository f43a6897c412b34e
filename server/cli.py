"""The ``statehost`` command.

``statehost serve`` starts the device-owning server; ``statehost token create|list|revoke``
manages the per-namespace tokens it accepts (stored hashed in the server's database).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from statehost._config import token_path
from statehost.server.db import SCOPES, Database, hash_token
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
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port,
        log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=30,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "token":
        return token_command(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
