"""Reload at start: every named state of the database back on the devices, from its file.

A damaged or missing file is recorded (state id -> why) and logged, never fatal: the other
states load, and the API reports the damaged ones with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cloudpickle

from statehost.server.persistence.database import Database, StateRow
from statehost.server.persistence.files import DamagedStateError, load_value, place
from statehost.server.store import Meta, StateStore

__all__ = ["reload_states"]

log = logging.getLogger("statehost.server")


def reload_states(db: Database, data_dir: Path, store: StateStore,
                  durability: Callable[[str], str], damaged: dict[str, str]) -> int:
    """Loads every state row's file into ``store``; fills ``damaged``; returns how many loaded."""
    count = 0
    for row in db.states():
        path = data_dir / row.file
        if row.durable_version == 0 and not path.exists():
            _damaged(damaged, row, f"never written to disk: the server stopped before the "
                     f"first flush of this state (namespace durability "
                     f"{str(durability(row.namespace))!r})")
            continue
        try:
            value, meta = load_value(path)
            cls = cloudpickle.loads(row.cls)
        except DamagedStateError as exc:
            _damaged(damaged, row, str(exc))
            continue
        except Exception as exc:  # the class cannot be unpickled here
            _damaged(damaged, row, f"its class cannot be loaded ({type(exc).__name__}: {exc})")
            continue
        version = int(meta.get("version", row.version))
        state = cls.__new__(cls)
        state.__setstate__({"value": place(value, row.sharding), "id": row.id,
                            "name": row.label, "tag": row.tag})
        store.add_named(state, Meta("", row.namespace, row.full_name, version, row.writer,
                                    row.updated, version))
        count += 1
    log.info("reloaded %d named state(s); %d damaged", count, len(damaged))
    return count


def _damaged(damaged: dict[str, str], row: StateRow, why: str) -> None:
    damaged[row.id] = why
    log.error("named state %s/%s (id %s) is damaged and was not loaded: %s",
              row.namespace, row.full_name, row.id, why)
