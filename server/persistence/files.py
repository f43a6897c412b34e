"""Persist state values as safetensors files, and record and restore their device sharding.

One file holds one pytree: leaves are tensors ``"0"``, ``"1"``, ... and the safetensors
metadata holds the pickled treedef, the leaves' real dtypes, the caller's ``meta`` and a
CRC-32 over all of it. Files are replaced atomically, so a crash leaves the old or the new
file, never a mix. Sharding is described as JSON, apart from the values, so a restarted
server can put each leaf back where it was, or on its default device if that is gone.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import secrets
import struct
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from statehost._errors import StatehostError
from statehost.server.persistence.permissions import FILE_MODE, make_private_dir

__all__ = ["DamagedStateError", "describe_sharding", "load_value", "place", "save_value"]

PyTree = Any

_FORMAT = "statehost-state/1"
_RESERVED = "statehost."
# Metadata keys of a state file; the checksum covers all but the last.
_FORMAT_KEY, _TREEDEF, _DTYPES, _META, _CRC32 = (
    _RESERVED + k for k in ("format", "treedef", "dtypes", "meta", "crc32")
)
# dtypes safetensors' numpy API stores as themselves; others (bfloat16, float8 from
# ml_dtypes) are stored as an unsigned view of the same width and viewed back on load.
_NATIVE = set(map(np.dtype, "f8 f4 f2 i8 u8 i4 u4 i2 u2 i1 u1 bool c8".split()))
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

_MSG_DAMAGED = (
    "statehost state file {path} is damaged: {what}. Restore it from a backup or delete it "
    "so the state is recreated; a file named like it with a '.tmp-' suffix is an unfinished "
    "write and is never read."
)
_MSG_META = (
    "save_value(meta=...): entry {key!r}: {value!r} is not allowed. Meta keys and values must "
    "both be str, and keys must not start with {reserved!r}, e.g. meta={{'name': 'weights'}}."
)
_MSG_DTYPE = (
    "save_value(value=...): leaf {index} has dtype {dtype}, which a state file cannot hold. "
    "Convert it first, e.g. with value.astype(numpy.float32) or numpy.asarray(...)."
)


class DamagedStateError(StatehostError, ValueError):
    """A state file is missing, truncated or corrupt."""


# -- saving --------------------------------------------------------------------------


def _to_storable(index: int, arr: np.ndarray) -> np.ndarray:
    dt = arr.dtype
    if dt in _NATIVE:
        return np.asarray(arr, order="C")  # not ascontiguousarray: that makes 0-d into 1-d
    if dt.hasobject or dt.kind in "SU" or dt.names is not None or dt.itemsize not in _UINT:
        raise TypeError(_MSG_DTYPE.format(index=index, dtype=dt))
    return np.asarray(arr, order="C").view(_UINT[dt.itemsize])


def _digest(tensors: dict[str, np.ndarray], header: dict[str, str]) -> str:
    # CRC-32 finds torn or corrupted files at ~6 GB/s (sha256: 1.8 GB/s, which made a
    # 128 MiB flush 70 ms slower). It guards against accidents, not against an attacker:
    # whoever can write the data directory can change the server's state anyway.
    crc = 0
    for key in (_FORMAT_KEY, _TREEDEF, _DTYPES, _META):
        crc = zlib.crc32(header[key].encode() + b"\0", crc)
    for name, arr in tensors.items():
        crc = zlib.crc32(f"{name}:{arr.dtype.str}:{arr.shape}\0".encode(), crc)
        crc = zlib.crc32(np.asarray(arr, order="C"), crc)  # the buffer itself, no copy
    return f"{crc:08x}"


def save_value(path: Path, value: PyTree, *, meta: dict[str, str] | None = None) -> int:
    """Write the pytree ``value`` to ``path`` as one safetensors file, atomically.

    Arguments:
        path: the file to write, mode ``0600``; missing parent folders are made ``0700``.
        value: a pytree of ``jax.Array``, numpy arrays or scalars (fetched with ``device_get``).
        meta: extra str-to-str entries, given back by :func:`load_value`.

    Returns:
        The number of bytes written.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> save_value(p, {"w": np.ones(2, np.float32)}, meta={"name": "w"}) == p.stat().st_size
        True
    """
    meta = dict(meta or {})
    for key, item in meta.items():
        if not (isinstance(key, str) and isinstance(item, str)) or key.startswith(_RESERVED):
            raise TypeError(_MSG_META.format(key=key, value=item, reserved=_RESERVED))
    leaves, treedef = jtu.tree_flatten(value)
    if jax.process_count() > 1:  # a server group (server/cluster.py): the leader writes
        from statehost.server.placement import gathered

        leaves = gathered(leaves)  # every process comes here, in one order
        if jax.process_index() > 0:
            return 0
    arrays = [np.asarray(x) for x in jax.device_get(leaves)]  # one batched transfer
    tensors = {str(i): _to_storable(i, a) for i, a in enumerate(arrays)}
    header = {
        _FORMAT_KEY: _FORMAT,
        _TREEDEF: base64.b64encode(pickle.dumps(treedef)).decode(),
        _DTYPES: json.dumps([a.dtype.name for a in arrays]),
        _META: json.dumps(meta, sort_keys=True),
    }
    header[_CRC32] = _digest(tensors, header)
    data = _st_save(tensors, metadata={**meta, **header})

    path = Path(path)
    make_private_dir(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


# -- loading -------------------------------------------------------------------------


def _damaged(path: Path, what: str) -> DamagedStateError:
    return DamagedStateError(_MSG_DAMAGED.format(path=path, what=what))


def _check_layout(path: Path, data: bytes) -> dict[str, str]:
    """Checks the header and that the data covers what it claims; returns the metadata."""
    if len(data) < 8:
        raise _damaged(path, f"unreadable header: the file has only {len(data)} bytes")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise _damaged(path, f"unreadable header: it claims {size} bytes, file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + size])
        stored = dict(header.pop("__metadata__", None) or {})
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise _damaged(path, f"unreadable header ({exc!r})") from exc
    keys = (_FORMAT_KEY, _TREEDEF, _DTYPES, _META, _CRC32)
    if stored.get(_FORMAT_KEY) != _FORMAT or not all(k in stored for k in keys):
        raise _damaged(path, f"unreadable header: not a {_FORMAT} file")
    if end > len(data) - 8 - size:
        have = len(data) - 8 - size
        raise _damaged(path, f"truncated: its tensors need {end} data bytes, it has {have}")
    return stored


def load_value(path: Path) -> tuple[PyTree, dict[str, str]]:
    """Read back what :func:`save_value` wrote, checking it is complete and consistent.

    Arguments:
        path: a file written by :func:`save_value`.

    Returns:
        ``(value, meta)``: the pytree of numpy arrays (same dtypes, shapes and structure as
        saved) and the caller's meta. Raises :class:`DamagedStateError` instead of returning
        anything from a missing, unreadable, truncated or altered file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> _ = save_value(p, [np.zeros((), np.int32)])
        >>> load_value(p)
        ([array(0, dtype=int32)], {})
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise _damaged(path, "missing: no such file") from exc
    except OSError as exc:
        raise _damaged(path, f"unreadable file ({exc})") from exc
    stored = _check_layout(path, data)
    try:
        loaded = _st_load(data)
    except Exception as exc:  # SafetensorError derives from Exception only
        raise _damaged(path, f"inconsistent tensor table ({exc})") from exc
    tensors = {str(i): loaded.get(str(i)) for i in range(len(loaded))}
    if any(t is None for t in tensors.values()):
        raise _damaged(path, f"inconsistent tensor table: names are not 0..{len(loaded) - 1}")
    if _digest(tensors, stored) != stored[_CRC32]:
        raise _damaged(path, "checksum mismatch: tensor data or metadata changed after writing")
    try:
        treedef = pickle.loads(base64.b64decode(stored[_TREEDEF]))
        dtypes = [np.dtype(d) for d in json.loads(stored[_DTYPES])]
        leaves = [t.view(d) for t, d in zip(tensors.values(), dtypes, strict=True)]
        return jtu.tree_unflatten(treedef, leaves), json.loads(stored[_META])
    except Exception as exc:  # checksummed, yet unusable: written by other code
        raise _damaged(path, f"unreadable treedef or dtypes ({exc!r})") from exc


# -- sharding ------------------------------------------------------------------------


def _describe(leaf: Any) -> dict:
    # An uncommitted array (jax.device_put without a device) may move to wherever a
    # computation wants it; placing it back on its device would commit it, and pmap then
    # refuses it. So it is restored uncommitted, as "default".
    if not isinstance(leaf, jax.Array) or not leaf.committed:
        return {"kind": "default"}
    sharding = leaf.sharding
    if isinstance(sharding, SingleDeviceSharding):
        return {"kind": "single", "device_id": next(iter(sharding.device_set)).id}
    if isinstance(sharding, NamedSharding):
        spec = [list(e) if isinstance(e, tuple) else e for e in sharding.spec]
        if all(e is None or isinstance(e, str | list) for e in spec):  # not UNCONSTRAINED
            mesh = sharding.mesh
            return {
                "kind": "named",
                "mesh_shape": [int(n) for n in mesh.devices.shape],
                "axis_names": [str(a) for a in mesh.axis_names],
                "axis_types": [t.name for t in mesh.axis_types],
                "device_ids": [int(d.id) for d in mesh.devices.flat],
                "spec": spec,
            }
    return {"kind": "default"}


def describe_sharding(value: PyTree) -> list[dict]:
    """Describe, as JSON, how each leaf of ``value`` is placed on devices.

    Arguments:
        value: a pytree; one entry per leaf, in ``jax.tree_util.tree_leaves`` order.

    Returns:
        ``{"kind": "named", "mesh_shape", "axis_names", "axis_types", "device_ids", "spec"}``
        for a ``NamedSharding`` (what statehost's ``pmap`` leaves on jax 0.10), ``{"kind":
        "single", "device_id"}`` for one device, ``{"kind": "default"}`` for anything else.

    Example:
        >>> describe_sharding({"a": np.ones(2)})
        [{'kind': 'default'}]
    """
    return [_describe(leaf) for leaf in jtu.tree_leaves(value)]


def _place(leaf: Any, desc: Any) -> jax.Array:
    if jax.process_count() > 1:
        return _place_in_group(leaf, desc)
    devices = {d.id: d for d in jax.devices()}
    kind = desc.get("kind") if isinstance(desc, dict) else None
    try:
        if kind == "single":
            return jax.device_put(leaf, devices[desc["device_id"]])
        if kind == "named":
            grid = np.array([devices[i] for i in desc["device_ids"]]).reshape(desc["mesh_shape"])
            types = tuple(AxisType[t] for t in desc["axis_types"]) if "axis_types" in desc else None
            mesh = Mesh(grid, tuple(desc["axis_names"]), axis_types=types)
            spec = PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in desc["spec"]))
            return jax.device_put(leaf, NamedSharding(mesh, spec))
    except Exception:  # a device gone after a restart, a stale description: use the default
        pass
    return jax.device_put(leaf)


def _place_in_group(leaf: Any, desc: Any) -> jax.Array:
    """A reloaded leaf in a server group: a global array laid out as recorded (every
    process has the whole value: no transfer between them), else replicated."""
    from statehost.server.placement import place as place_globally

    host = np.asarray(leaf)
    if isinstance(desc, dict) and desc.get("kind") == "named":
        try:
            devices = {d.id: d for d in jax.devices()}
            grid = np.array([devices[i] for i in desc["device_ids"]]).reshape(desc["mesh_shape"])
            mesh = Mesh(grid, tuple(desc["axis_names"]))
            spec = PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in desc["spec"]))
            return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec),
                                                lambda index: host[index], dtype=host.dtype)
        except Exception:  # a stale description: replicated, as a fresh upload is
            pass
    return place_globally(host)


def place(value: PyTree, shardings: list[dict] | None) -> PyTree:
    """Put each leaf of ``value`` on the devices :func:`describe_sharding` recorded.

    Never fails because of placement: a leaf whose description names devices this host lacks,
    or is stale, goes to the default device; so do all leaves if ``shardings`` is ``None`` or
    does not have one entry per leaf.

    Arguments:
        value: a pytree, typically from :func:`load_value`.
        shardings: the list :func:`describe_sharding` returned, or ``None``.

    Returns:
        The same pytree with ``jax.Array`` leaves.

    Example:
        >>> place([np.ones(2)], [{"kind": "single", "device_id": 99}])[0].shape
        (2,)
    """
    leaves, treedef = jtu.tree_flatten(value)
    if shardings is None or len(shardings) != len(leaves):
        shardings = [None] * len(leaves)
    return jtu.tree_unflatten(
        treedef, [_place(x, d) for x, d in zip(leaves, shardings, strict=True)]
    )
