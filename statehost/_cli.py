"""The ``statehost`` command: a dispatcher that loads only the command being run.

``serve``, ``token`` and ``repair`` belong to the server (``statehost.server.cli``); ``ls``,
``doctor``, ``checkpoint`` and ``jobs`` to the client (``statehost.client._cli``). This module
knows their names and one-line help, builds the top-level parser from them, and
imports the module that owns a command, by name, only when that command runs. So the
core imports neither the client nor the server (the same lazy door as ``_connect``),
``statehost --help`` loads neither, and ``statehost ls`` never loads the server.

A command module exposes ``COMMANDS``, a mapping from command name to
:class:`Command`. Adding a command is one entry there and one line in ``_COMMANDS``
below; ``tests/test_layers.py`` checks that the two agree.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["Command", "main"]


class Command(NamedTuple):
    """One command, as the module that owns it hands it to the dispatcher.

    Arguments:
        arguments: adds the command's arguments to the parser the dispatcher made for it.
        run: runs the parsed command and returns the process's exit status.
    """

    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Owner(NamedTuple):
    module: str  # imported only when one of its commands runs
    extra: str  # the pip extra that module needs
    help: str


_SERVER, _CLIENT = "statehost.server.cli", "statehost.client._cli"
_COMMANDS: dict[str, _Owner] = {
    "serve": _Owner(_SERVER, "server", "start the server that owns this machine's devices"),
    "token": _Owner(_SERVER, "server", "create, list or revoke namespace tokens"),
    "repair": _Owner(_SERVER, "server", "rebuild a damaged server database from its state files"),
    "ls": _Owner(_CLIENT, "client", "list a running server's namespaces, objects and states"),
    "doctor": _Owner(_CLIENT, "client",
                     "check that this client and a running server can work together"),
    "checkpoint": _Owner(_CLIENT, "client", "write named states to the server's disk now"),
    "jobs": _Owner(_CLIENT, "client", "list this token's jobs (server-side loops) and their "
                                      "progress"),
    "namespace": _Owner(_CLIENT, "client", "set or show a namespace's quotas on a running "
                                           "server"),
}

_DESCRIPTION = (
    "statehost serve starts the server that owns this machine's devices; statehost token "
    "manages the per-namespace tokens it accepts; statehost repair rebuilds its database; "
    "statehost ls, doctor, checkpoint and jobs look at and act on a running server over HTTP. "
    "'statehost COMMAND --help' shows a command's options."
)
_MSG_MISSING_EXTRA = (
    "statehost {command}: this command needs the {extra} dependencies, and {missing!r} is "
    "not installed. Fix: pip install 'statehost[{extra}]' (make serve and make test install "
    "them into .venv)."
)


class _MissingExtraError(Exception):
    pass


def _load(name: str) -> Command:
    owner = _COMMANDS[name]
    try:
        module = importlib.import_module(owner.module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "statehost":
            raise  # a bug in statehost, not a missing dependency
        raise _MissingExtraError(_MSG_MISSING_EXTRA.format(
            command=name, extra=owner.extra, missing=exc.name)) from exc
    command: Command = module.COMMANDS[name]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``statehost ARGV...`` and returns its exit status (argparse exits on --help).

    Arguments:
        argv: the arguments after ``statehost``; ``sys.argv[1:]`` when omitted.

    Returns:
        The command's exit status.

    Example:
        >>> main(["token", "revoke", "not-hex"])
        1
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top level takes no option but --help, so the command, if any, comes first.
    chosen = argv[0] if argv and argv[0] in _COMMANDS else None
    parser = argparse.ArgumentParser(prog="statehost", description=_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    command: Command | None = None
    for name, owner in _COMMANDS.items():
        sub = commands.add_parser(name, help=owner.help, description=owner.help)
        if name == chosen:
            try:
                command = _load(name)
            except _MissingExtraError as exc:
                print(exc, file=sys.stderr)
                return 1
            command.arguments(sub)
    args = parser.parse_args(argv)
    assert command is not None, args  # argparse has rejected any other first argument
    return command.run(args)
