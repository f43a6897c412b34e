"""``statehost repair``: rebuild a damaged metadata database from the state files.

Every state file carries, in its safetensors metadata, the rows that describe it (its
namespace, object, path, class, name, tag, version, writer, sharding, the namespace's
durability and its object's row with the pickled structure; see ``service.index_meta``).
Repair moves the damaged database aside, creates a fresh one, and refills the
``namespaces``, ``objects`` and ``states`` tables from every intact file. Tokens and
registered functions live only in the database: they are not recovered.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from statehost.server.persistence.database import (
    DamagedDatabaseError,
    Database,
    ObjectRow,
    StateRow,
)
from statehost.server.persistence.durability import Durability
from statehost.server.persistence.files import DamagedStateError, load_value
from statehost.server.persistence.service import Persistence, state_file
from statehost.server.store import StateStore

__all__ = ["RepairReport", "repair", "repair_arguments", "repair_command"]

_MSG_LOST = (
    "Tokens cannot be recovered from state files: recreate them with `statehost token create "
    "--namespace NS --scope SCOPE --data-dir {data_dir}`. Registered functions are not in "
    "state files either: register them again."
)


@dataclass
class RepairReport:
    """What :func:`repair` did; ``lines()`` is what ``statehost repair`` prints."""

    data_dir: Path
    healthy: bool = False
    moved_to: Path | None = None
    namespaces: int = 0
    objects: int = 0
    states: int = 0
    skipped: list[str] = field(default_factory=list)  # "file: why"

    def lines(self) -> list[str]:
        db = self.data_dir / "statehost.db"
        if self.healthy:
            return [f"statehost repair: {db} is intact and lists the named states; nothing to "
                    "repair."]
        out = []
        if self.moved_to is not None:
            out.append(f"statehost repair: moved the damaged database to {self.moved_to}.")
        out.append(f"statehost repair: rebuilt {db} from {self.data_dir / 'states'}: "
                   f"{self.objects} object(s), {self.states} state(s) in {self.namespaces} "
                   "namespace(s).")
        out += [f"  skipped {item}" for item in self.skipped]
        out.append(_MSG_LOST.format(data_dir=self.data_dir))
        return out


def _is_healthy(db_path: Path) -> bool:
    """Opens like the server does: intact, and not empty while state files exist."""
    persistence = Persistence(db_path.parent, StateStore())
    try:
        persistence.open()
    except DamagedDatabaseError:
        return False
    persistence.close()
    return True


def _move_aside(db_path: Path) -> Path | None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = None
    for suffix in ("", "-wal", "-shm"):
        src = db_path.with_name(db_path.name + suffix)
        if src.exists():
            dst = db_path.with_name(f"{db_path.name}.damaged-{stamp}{suffix}")
            src.rename(dst)
            moved = moved or dst
    return moved


def _read(path: Path) -> tuple[Any, dict[str, Any]]:
    """The value and the index of one state file; raises ``ValueError`` saying why not."""
    value, meta = load_value(path)  # checks the checksum: a torn file is never used
    if "index" not in meta:
        raise ValueError("written by a statehost version that kept no index in state files")
    index = json.loads(meta["index"])
    if index.get("id") != path.stem or "object_row" not in index:
        raise ValueError("its index does not describe this file")
    return value, index


def _state_row(value: Any, index: dict[str, Any]) -> StateRow:
    leaves = jax.tree_util.tree_leaves(value)
    return StateRow(
        index["id"], index["namespace"], index["object"], index["path"],
        base64.b64decode(index["class"]), index["name"], index["tag"],
        [{"shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)} for x in leaves],
        sum(int(np.asarray(x).nbytes) for x in leaves), int(index["version"]),
        index["writer"], float(index["updated"]), index["sharding"],
        state_file(index["namespace"], index["id"]), int(index["version"]),
    )


def repair(data_dir: Path) -> RepairReport:
    """Rebuilds ``data_dir/statehost.db`` from the state files, if it is damaged.

    Run it with the server stopped. An intact database is left alone. Otherwise the
    damaged files move aside (``statehost.db.damaged-<time>``), and a new database is
    filled from every intact state file; damaged files, files without an index (written
    by older versions) and files their object no longer lists are skipped and reported.

    Arguments:
        data_dir: the server's data directory.

    Returns:
        A :class:`RepairReport`.

    Example:
        >>> import tempfile
        >>> repair(Path(tempfile.mkdtemp())).healthy
        True
    """
    report = RepairReport(data_dir)
    db_path = data_dir / "statehost.db"
    if _is_healthy(db_path):
        report.healthy = True
        return report
    report.moved_to = _move_aside(db_path)

    found: dict[tuple[str, str], list[tuple[StateRow, dict[str, Any]]]] = {}
    durability: dict[str, str] = {}
    for path in sorted((data_dir / "states").glob("*/*.safetensors")):
        try:
            value, index = _read(path)
        except (DamagedStateError, ValueError, KeyError, TypeError) as exc:
            report.skipped.append(f"{path}: {exc}")
            continue
        row = _state_row(value, index)
        found.setdefault((row.namespace, row.object), []).append((row, index["object_row"]))
        durability[row.namespace] = index.get("durability", str(Durability.INTERVAL))

    db = Database(db_path)
    try:
        for (namespace, name), entries in sorted(found.items()):
            # The newest copy of the object's row wins; states it no longer lists are
            # leftovers of an older put.
            newest = max((o for _, o in entries), key=lambda o: o["updated"])
            rows = [r for r, _ in entries if r.id in newest["state_ids"]]
            for row, _ in entries:
                if row.id not in newest["state_ids"]:
                    report.skipped.append(f"{data_dir / row.file}: {namespace}/{name} no "
                                          "longer lists this state")
            missing = set(newest["state_ids"]) - {r.id for r in rows}
            if not rows:
                report.skipped.append(f"{namespace}/{name}: no intact file for any of its "
                                      "states; not rebuilt")
                continue
            if missing:
                report.skipped.append(f"{namespace}/{name}: no intact file for state(s) "
                                      f"{', '.join(sorted(missing))}; the object is rebuilt "
                                      "without them")
            db.ensure_namespace(namespace, durability[namespace])
            db.put_object(ObjectRow(namespace, name, newest["kind"],
                                    base64.b64decode(newest["structure"]),
                                    newest["state_ids"], newest["paths"], newest["created"],
                                    newest["updated"]), rows)
            report.objects += 1
            report.states += len(rows)
        report.namespaces = len({ns for ns, _ in found})
    finally:
        db.close()
    return report


def repair_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``statehost repair``."""
    parser.add_argument("--data-dir", type=Path,
                        help="the server's data directory (STATEHOST_DATA_DIR, default "
                             "$XDG_DATA_HOME/statehost, else ~/.local/share/statehost)")


def repair_command(args: argparse.Namespace) -> int:
    """``statehost repair [--data-dir DIR]``: runs :func:`repair`, prints its report."""
    from statehost.server.settings import Settings

    report = repair(Settings.from_env(data_dir=args.data_dir).data_dir)
    print("\n".join(report.lines()))
    return 0
