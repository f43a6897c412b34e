"""The client's commands: ``statehost ls``, ``doctor``, ``checkpoint``, ``jobs`` and
``namespace``.

They look at and act on a running server through its JSON API, with httpx and no
session: they ship no pickles, so they work even where the client's and the server's
versions differ (``doctor`` is the one that reports that). This module imports httpx,
the client's token lookup and exception classes: not the server, and not the
client's frames or pickling. The dispatcher (``statehost._cli``) imports it when one of
``COMMANDS`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from statehost._cli import Command
from statehost.client._errors import (
    BY_TYPE,
    AuthError,
    ClientError,
    ProtocolError,
    ServerError,
    TransportError,
)
from statehost.client._token import TokenSource

__all__ = ["COMMANDS", "checkpoint", "doctor", "jobs", "ls", "namespace"]

_DEFAULT_URL = "http://127.0.0.1:8470"

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
_MSG_GROUP_DOWN = (
    "process(es) {which} of the server's group are not answering: the server refuses new "
    "calls until the whole group is restarted. Fix: restart every process of the group "
    "(README, 'Several hosts')."
)
_MSG_UNREACHABLE = (
    "cannot connect to {url} ({why}). Is `statehost serve` running there? Start it with "
    "`statehost serve`, or check the URL and port."
)
_MSG_URL_AS_NAME = (
    "statehost {command}: {value!r} is a URL, but the positional argument is a {name}; the "
    "server is given with --url. Fix: statehost {command} --url {value}"
)
_MSG_NO_NAMESPACE = (
    "namespace {namespace!r} is not visible on {url}: it does not exist, or the token cannot "
    "read it. Fix: run 'statehost ls' without a namespace to see the visible ones."
)


# -- parsers ----------------------------------------------------------------------
def _common_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get("STATEHOST_URL")
    variable = f"STATEHOST_URL={env}" if env else "STATEHOST_URL"
    parser.add_argument("--url", default=env or _DEFAULT_URL,
                        help=f"the server ({variable}, default {_DEFAULT_URL})")
    parser.add_argument("--token", help="bearer token (STATEHOST_TOKEN; default: the local "
                                         "server's token file for a loopback URL)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the server (default 30)")


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("namespace", nargs="?", metavar="NAMESPACE",
                        help="list only this namespace (default: every namespace the token "
                             "can read)")
    _common_arguments(parser)


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="'namespace/object' or a whole 'namespace' (default: every "
                             "namespace the token can see)")
    _common_arguments(parser)


_QUOTA_FLAGS = (("--max-bytes", "max_bytes", "bytes its states hold on all devices together"),
                ("--max-bytes-per-device", "max_bytes_per_device",
                 "bytes its states hold on any one device"),
                ("--max-sessions", "max_sessions", "open sessions of its tokens"),
                ("--max-queued", "max_queued", "its calls waiting in the server's queue"))
_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _quota_value(text: str) -> int | None:
    """A quota flag's value: ``none`` (clear it), bytes, or a size with a unit (8GiB)."""
    if text.strip().lower() == "none":
        return None
    raw = text.strip().upper().replace(" ", "")
    digits = raw.rstrip("KMGTIB")
    unit = raw[len(digits):]
    try:
        if not digits or unit not in _UNITS:
            raise ValueError(text)
        return int(float(digits) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a quota: write a number (4), bytes with a unit (8GiB, 512MiB, "
            "100MB), or none to clear it") from None


def _namespace_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="namespace_command", required=True)
    change = commands.add_parser(
        "set", help="set a namespace's quotas (a server token) or durability; 'none' clears "
                    "a quota, so the server's default applies again")
    change.add_argument("namespace", metavar="NAMESPACE")
    for flag, dest, meaning in _QUOTA_FLAGS:
        change.add_argument(flag, dest=dest, type=_quota_value, default=argparse.SUPPRESS,
                            help=f"{meaning}; 'none' clears it")
    change.add_argument("--durability", choices=["sync", "interval", "none"],
                        default=argparse.SUPPRESS, help="when its named states reach the disk")
    _common_arguments(change)
    show = commands.add_parser("show", help="a namespace's quotas, and what it holds")
    show.add_argument("namespace", metavar="NAMESPACE")
    _common_arguments(show)


# -- HTTP -------------------------------------------------------------------------
@contextlib.contextmanager
def _translate(what: str, url: str, timeout: float) -> Iterator[None]:
    """The one place where these commands' httpx exceptions become statehost exceptions."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TransportError(f"{what}: no answer from {url} within {timeout:g} s "
                             f"({type(exc).__name__}). Fix: pass a larger --timeout, or check "
                             "the server's load.") from exc
    except httpx.ConnectError as exc:
        raise TransportError(f"{what}: cannot connect to {url} ({exc}). Is `statehost serve` "
                             "running there? Start it with `statehost serve`, or check the URL "
                             "(--url, STATEHOST_URL).") from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"{what}: the connection to {url} failed ({exc}).") from exc


class _Remote:
    """The server's JSON API over one pooled httpx connection; HTTP errors raise the
    client's exception for the server's error type."""

    def __init__(self, args: argparse.Namespace):
        self.url = args.url.rstrip("/")
        self.timeout = args.timeout
        token = TokenSource.find(self.url, args.token).token  # as statehost.connect finds it
        self.token_sent = bool(token)
        self._http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(args.timeout, connect=min(args.timeout, 10)),
            headers={"authorization": f"Bearer {token}"} if token else {},
        )

    def __enter__(self) -> _Remote:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        what = f"{method} {path}"
        with _translate(what, self.url, self.timeout):
            response = self._http.request(method, path, **kwargs)
        if response.status_code < 400:
            return response.json()
        try:
            error = response.json()["error"]
            kind, message = str(error["type"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            kind, message = "", f"HTTP {response.status_code}: {response.content[:500]!r}"
        fallback = ServerError if response.status_code >= 500 else ProtocolError
        cls = BY_TYPE.get(kind, fallback)
        raise cls(message if message.startswith(what) else f"{what}: {message}",
                  status=response.status_code, body=error if kind else {})


def _fail(command: str, exc: Exception) -> int:
    print(f"statehost {command}: {exc}", file=sys.stderr)
    return 1


# -- output -----------------------------------------------------------------------
def _size(n: float | None) -> str:
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


# -- commands ---------------------------------------------------------------------
def _url_given_as(command: str, value: str | None, name: str) -> bool:
    """Says how to fix ``statehost ls URL`` (the old form) when the positional is a URL."""
    if value is None or "://" not in value:
        return False
    print(_MSG_URL_AS_NAME.format(command=command, value=value, name=name), file=sys.stderr)
    return True


def ls(args: argparse.Namespace) -> int:
    """Prints every namespace the token can read (or only ``NAMESPACE``), with its objects
    and states."""
    if _url_given_as("ls", args.namespace, "NAMESPACE"):
        return 2
    try:
        with _Remote(args) as remote:
            namespaces = remote.json("GET", "/v1/namespaces")["namespaces"]
            if args.namespace is not None:
                namespaces = [ns for ns in namespaces if ns["name"] == args.namespace]
                if not namespaces:
                    return _fail("ls", ValueError(_MSG_NO_NAMESPACE.format(
                        namespace=args.namespace, url=remote.url)))
            listed = [(ns, remote.json("GET", f"/v1/namespaces/{ns['name']}/objects")["objects"])
                      for ns in namespaces]
    except ClientError as exc:
        return _fail("ls", exc)
    if not listed:
        print(f"no namespaces visible on {args.url}")
        return 0
    for ns, objects in listed:
        print(f"{ns['name']}  (durability {ns['durability']}, {len(objects)} object(s), "
              f"{_size(ns['resident_bytes'])} resident)")
        if "ledger" in ns:
            print(f"  {_ledger_line(ns)}")
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
    # The versions this client would put in its frames; reading jax's version imports JAX.
    from statehost import wire as _wire

    mine = _wire.local_versions()
    print(f"statehost doctor: {args.url}")
    with _Remote(args) as remote:
        try:
            info = remote.json("GET", "/v1/info")
        except TransportError as exc:
            why = str(exc.__cause__ or exc)
            print(f"  PROBLEM  {_MSG_UNREACHABLE.format(url=args.url, why=why)}")
            return 1
        except AuthError:
            print(f"  PROBLEM  {_MSG_BAD_TOKEN if remote.token_sent else _MSG_NO_TOKEN}")
            _table([("VERSION", "CLIENT")] + [(k, str(v)) for k, v in mine.items()], "  ")
            return 1
        except ClientError as exc:
            return _fail("doctor", exc)

    theirs = info.get("versions", {})
    problems = _wire.version_problems(mine, theirs, me="client", them="server")
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
    processes = info.get("processes") or []
    if processes:  # a server spanning a group of processes (statehost serve --coordinator)
        print(f"  processes: {len(processes)} (a jax.distributed group; process 0 leads)")
        rows = [("PROCESS", "ROLE", "DEVICES", "HEALTH", "HEARTBEAT")]
        for p in processes:
            age = p.get("heartbeat_age_s")
            health = p.get("health", "unknown")
            rows.append((str(p.get("index")), str(p.get("role", "")),
                         ", ".join(map(str, p.get("devices", []))) or "none",
                         health + (f": {p['reason']}" if p.get("reason") else ""),
                         "-" if age is None else f"{age:.1f} s ago"))
        _table(rows, "  ")
        lost = [p for p in processes if p.get("health") != "ok"]
        if lost:
            which = ", ".join(str(p.get("index")) for p in lost)
            print(f"  PROBLEM  {_MSG_GROUP_DOWN.format(which=which)}")
            return 1
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
    if _url_given_as("checkpoint", args.name, "NAME ('namespace/object' or 'namespace')"):
        return 2
    try:
        with _Remote(args) as remote:
            if args.name:
                targets = [args.name]
            else:
                targets = [ns["name"] for ns in remote.json("GET", "/v1/namespaces")["namespaces"]]
            total = 0
            for target in targets:
                namespace, _, obj = target.partition("/")
                params = {"name": obj} if obj else {}
                flushed = remote.json("POST", f"/v1/namespaces/{namespace}/checkpoint",
                                      params=params)["flushed"]
                total += flushed
                print(f"{target}: flushed {flushed} state(s)")
    except ClientError as exc:
        return _fail("checkpoint", exc)
    print(f"flushed {total} state(s) in {len(targets)} target(s)")
    return 0


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def jobs(args: argparse.Namespace) -> int:
    """Prints the token's jobs (every session's, oldest first): status, progress, rate."""
    try:
        with _Remote(args) as remote:
            listed = remote.json("GET", "/v1/jobs")["jobs"]
    except ClientError as exc:
        return _fail("jobs", exc)
    if not listed:
        print(f"no jobs on {args.url} for this token")
        return 0
    rows = [("JOB", "STATUS", "STEPS", "STEPS/S", "ELAPSED", "ETA", "SESSION", "NOTE")]
    for job in listed:
        shown = job["progress"]
        rate = shown.get("steps_per_second")
        error = job.get("error") or {}
        note = error.get("type", "")
        if job.get("cancel_requested") and job["status"] in ("queued", "running"):
            note = "cancel requested"
        elif job["status"] == "cancelled":
            note = job.get("reason") or "cancelled"
        rows.append((job["id"], job["status"], f"{shown['done']}/{shown['total']}",
                     "-" if rate is None else f"{rate:.1f}", _seconds(shown.get("elapsed_s")),
                     _seconds(shown.get("eta_s")), job.get("session", "-"), note))
    _table(rows)
    return 0


def _ledger_line(ns: dict[str, Any]) -> str:
    """``on devices: 4.0 KiB (named 4.0 KiB, sessions 0 B); quotas: max_bytes 8.0 GiB``."""
    ledger, quotas = ns["ledger"], ns.get("quotas", {})
    set_ = [f"{k} {_size(v) if 'bytes' in k else v}" for k, v in quotas.items()
            if k != "own" and v is not None]
    return (f"on devices: {_size(ledger['bytes'])} (named {_size(ledger['named_bytes'])}, "
            f"sessions {_size(ledger['session_bytes'])}); quotas: "
            f"{', '.join(set_) or 'none'}")


def namespace(args: argparse.Namespace) -> int:
    """``namespace set NS --max-bytes 8GiB ...`` (PUT /v1/namespaces/NS; quotas need a server
    token) and ``namespace show NS``: its quotas in effect, which it sets itself, and its
    ledger."""
    command = f"namespace {args.namespace_command}"
    if _url_given_as(command, args.namespace, "NAMESPACE"):
        return 2
    try:
        with _Remote(args) as remote:
            if args.namespace_command == "set":
                body = {dest: getattr(args, dest) for _, dest, _ in _QUOTA_FLAGS
                        if hasattr(args, dest)}
                if hasattr(args, "durability"):
                    body["durability"] = args.durability
                if not body:
                    return _fail(command, ValueError(
                        "nothing to set. Fix: give one or more of --max-bytes, "
                        "--max-bytes-per-device, --max-sessions, --max-queued, --durability."))
                remote.json("PUT", f"/v1/namespaces/{args.namespace}", json=body)
            listed = [ns for ns in remote.json("GET", "/v1/namespaces")["namespaces"]
                      if ns["name"] == args.namespace]
    except ClientError as exc:
        return _fail(command, exc)
    if not listed:
        return _fail(command, ValueError(_MSG_NO_NAMESPACE.format(
            namespace=args.namespace, url=args.url)))
    ns = listed[0]
    ledger, quotas = ns["ledger"], ns["quotas"]
    print(f"{ns['name']}  (durability {ns['durability']})")
    rows = [("QUOTA", "IN EFFECT", "SET HERE", "USED")]
    used = {"max_bytes": _size(ledger["bytes"]),
            "max_bytes_per_device": _size(max(ledger["by_device"].values(), default=0)),
            "max_sessions": str(ns.get("sessions", "-")),
            "max_queued": str(ns.get("queued", "-"))}
    for key in used:
        def shown(value: Any, key: str = key) -> str:
            if value is None:
                return "none"
            return _size(value) if "bytes" in key else str(value)
        rows.append((key, shown(quotas[key]),
                     shown(quotas["own"][key]) if quotas["own"][key] is not None
                     else "(server default)", used[key]))
    _table(rows, "  ")
    print(f"  {_ledger_line(ns)}")
    for device, n in ledger["by_device"].items():
        print(f"    {device}: {_size(n)}")
    return 0


#: The commands ``statehost._cli`` dispatches here, by name.
COMMANDS: dict[str, Command] = {
    "ls": Command(_ls_arguments, ls),
    "doctor": Command(_common_arguments, doctor),
    "checkpoint": Command(_checkpoint_arguments, checkpoint),
    "jobs": Command(_common_arguments, jobs),
    "namespace": Command(_namespace_arguments, namespace),
}
