"""Admission by device memory: a call's program starts only when it fits in its devices.

Before a program runs for the first time with an argument signature, it is compiled (not
run) and its peak device memory estimated from the executable
(``compiled.memory_analysis()``: temp + arguments + outputs - aliased, per device, on
each device the executable runs on). The estimate is cached with the transform, per
signature; the compilation is the one the call then runs (JAX reuses it), so the
estimate costs no second compile.

A call is admitted when, on each of its devices, the estimate minus the bytes of its own
states already resident there fits in the free memory:

* ``device.memory_stats()``'s ``bytes_limit - bytes_in_use`` where the platform reports
  it (GPUs, TPUs), less what running calls were admitted with;
* else ``--device-memory`` (``STATEHOST_DEVICE_MEMORY``) less the bytes of the states
  resident on the device and what running calls were admitted with (how CPU tests
  exercise this path);
* else (a CPU server without ``--device-memory``) nothing is estimated or checked.

An admitted call reserves its estimate until it finishes. A call that does not fit now is
put back in the scheduler's queue, holding no thread, until memory frees or its deadline
passes (then a 507 ``DeviceMemoryError`` names its estimate, the free memory and the
largest resident states); one that needs more than a device has fails at once. If XLA
runs out of memory anyway (``RESOURCE_EXHAUSTED``), the call fails with a
``DeviceMemoryError`` that says so; its states are unchanged.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax

from statehost.server.errors import DeviceMemoryError

if TYPE_CHECKING:
    from statehost.server.calls import Call

__all__ = ["Admission", "Demand", "NotAdmitted", "Verdict", "device_bytes", "is_out_of_memory",
           "out_of_memory", "size"]

_MSG_NEVER_FITS = (
    "{kind} {id}: its program needs an estimated {need} on device {device} ({detail}), more "
    "than the device's {limit} ({source}): it can never run there, and was not started, so "
    "nothing was applied. Fix: make the program smaller (a smaller batch, or pmap it over "
    "more devices so each holds a slice), or run it on a server with bigger devices."
)
_MSG_NO_ROOM = (
    "{kind} {id}: not started within its {timeout:g} s deadline: its program needs an "
    "estimated {need} on device {device} ({detail}), and {free} of the device's {limit} "
    "were free ({source}; {reserved} held by running calls). It waited {waited:.3g} s for "
    "memory and was never started, so nothing was applied. Largest states resident on "
    "device {device}: {largest}. Fix: free memory (delete named states no one needs, close "
    "idle sessions: their states go with them), or send it again later, or with a longer "
    "timeout."
)
_MSG_XLA_OOM = (
    "{where}: XLA ran out of device memory while the call ran (RESOURCE_EXHAUSTED: {text}). "
    "The call was not applied: every state keeps its previous value, and the server goes on "
    "serving. {estimate}Fix: make the program smaller (a smaller batch, or pmap it over "
    "more devices), or free memory (delete named states, close idle sessions) and retry."
)
#: How often calls waiting for memory are looked at again when nothing else happens: the
#: memory a platform reports can free without an event the scheduler sees.
RECHECK_S = 0.1


def size(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Demand:
    """A program's estimated peak memory on each device it runs on (bytes).

    Attributes:
        per_device: temp + arguments + outputs - aliased, from ``memory_analysis()``.
        devices: the ids of the devices the executable runs on.
        temp, arguments, outputs, aliased: the parts, for messages.
    """

    per_device: int
    devices: tuple[int, ...]
    temp: int = 0
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0

    @classmethod
    def of(cls, compiled: Any) -> Demand | None:
        """The demand of a ``jax.stages.Compiled``; ``None`` if it has no memory figures."""
        stats = compiled.memory_analysis()
        if stats is None:
            return None
        temp, arguments = int(stats.temp_size_in_bytes), int(stats.argument_size_in_bytes)
        outputs, aliased = int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes)
        devices = tuple(d.id for d in compiled.runtime_executable().local_devices())
        return cls(max(0, temp + arguments + outputs - aliased), devices, temp, arguments,
                   outputs, aliased)

    def describe(self) -> str:
        return (f"temp {size(self.temp)} + arguments {size(self.arguments)} + outputs "
                f"{size(self.outputs)} - aliased {size(self.aliased)}")


class NotAdmitted(Exception):  # noqa: N818  (a signal to the scheduler, never answered)
    """Raised on a worker before anything ran: the call does not fit now; the scheduler
    puts it back in its queue with its ``demand``."""

    def __init__(self, demand: Demand):
        super().__init__(f"does not fit now: {demand.per_device} bytes per device")
        self.demand = demand


@dataclass(frozen=True)
class Verdict:
    """Whether a demand fits now: ``fits``; else the device that lacks room and its
    figures (``never``: the device is too small even when empty)."""

    fits: bool
    never: bool = False
    device: int | None = None
    need: int = 0
    free: int = 0
    limit: int = 0
    reserved: int = 0
    source: str = ""


_FITS = Verdict(True)


def device_bytes(value: Any) -> dict[int, int]:
    """Bytes a state value holds on each device (a replicated array counts on each)."""
    out: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves(value):
        if isinstance(leaf, jax.Array):
            for dev, n in _array_bytes(leaf):
                out[dev] = out.get(dev, 0) + n
    return out


def _array_bytes(leaf: jax.Array) -> tuple[tuple[int, int], ...]:
    try:
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        return tuple((d.id, shard) for d in leaf.sharding.device_set)
    except Exception:  # a sharding that cannot say: count each shard
        per: dict[int, int] = {}
        for s in leaf.addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
        return tuple(per.items())


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is XLA running out of device memory."""
    return isinstance(exc, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(exc)


class Admission:
    """Estimates, checks and reserves the device memory of calls (see the module docstring).

    Arguments:
        device_memory: bytes per device for devices that report no memory (``None``: such
            devices admit everything).
        resident: returns ``(label, value)`` of every resident state (the label names it
            in messages).
        devices: the server's devices (``jax.devices()`` by default).
        value_of: a resident state's value by id (``None`` if gone), to credit a call's own
            states without counting every resident one.
    """

    def __init__(self, device_memory: int | None,
                 resident: Callable[[], Iterable[tuple[str, str, Any]]],
                 devices: Iterable[Any] | None = None,
                 value_of: Callable[[str], Any] | None = None):
        self.device_memory = device_memory
        self._resident = resident
        self._value_of = value_of
        self._devices = {d.id: d for d in (jax.devices() if devices is None else devices)}
        self._reported = {i for i, d in self._devices.items() if _limit(d) is not None}
        self._lock = threading.Lock()
        self._reserved: dict[int, int] = {}  # device id -> bytes running calls hold
        self._held: dict[int, Demand] = {}  # id(call) -> its reservation
        self._estimates: weakref.WeakKeyDictionary[Any, dict[Hashable, Demand | None]] = \
            weakref.WeakKeyDictionary()

    @property
    def enabled(self) -> bool:
        """Whether any device is checked (reports its memory, or ``--device-memory``)."""
        return bool(self._reported) or self.device_memory is not None

    # -- estimates ----------------------------------------------------------------------
    def cached(self, transform: Any, signature: Hashable) -> tuple[bool, Demand | None]:
        """``(known, demand)`` of a transform's signature estimated before."""
        try:
            found = self._estimates.get(transform, {})
        except TypeError:  # not weak-referenceable: never cached
            return False, None
        return (signature in found), found.get(signature)

    def remember(self, transform: Any, signature: Hashable, demand: Demand | None) -> None:
        try:
            self._estimates.setdefault(transform, {})[signature] = demand
        except TypeError:
            pass

    # -- checks ---------------------------------------------------------------------------
    def check(self, demand: Demand, own: Iterable[str] = ()) -> Verdict:
        """Whether ``demand`` fits now, crediting the bytes of the call's own resident
        states (``own``: their ids; they are counted among the program's arguments)."""
        own = set(own)
        resident: dict[int, int] = {}
        mine: dict[int, int] = {}
        # Every resident state is counted only for devices without figures of their own
        # (O(states) per check; the platform's bytes_in_use costs nothing).
        if self.device_memory is not None and not self._reported.issuperset(demand.devices):
            for state_id, _, value in self._resident():
                for dev, n in device_bytes(value).items():
                    resident[dev] = resident.get(dev, 0) + n
                    if state_id in own:
                        mine[dev] = mine.get(dev, 0) + n
        elif own and self._value_of is not None:
            for state_id in own:
                for dev, n in device_bytes(self._value_of(state_id)).items():
                    mine[dev] = mine.get(dev, 0) + n
        with self._lock:
            reserved = dict(self._reserved)
        for dev in demand.devices:
            device = self._devices.get(dev)
            if device is None:
                continue
            limit, in_use, source = self._capacity(device, resident.get(dev, 0))
            if limit is None:
                continue
            if demand.per_device > limit:
                return Verdict(False, True, dev, demand.per_device, max(0, limit - in_use),
                               limit, reserved.get(dev, 0), source)
            need = max(0, demand.per_device - mine.get(dev, 0))
            free = limit - in_use - reserved.get(dev, 0)
            if need > free:
                return Verdict(False, False, dev, demand.per_device, max(0, free), limit,
                               reserved.get(dev, 0), source)
        return _FITS

    def _capacity(self, device: Any, resident: int) -> tuple[int | None, int, str]:
        """``(limit, in use, where the figures come from)`` of one device."""
        if device.id in self._reported:
            stats = _stats(device)
            if stats is not None and "bytes_limit" in stats:
                return (int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)),
                        "device.memory_stats()")
        if self.device_memory is None:
            return None, 0, ""
        return self.device_memory, resident, "--device-memory less the resident states"

    # -- reservations (the scheduler holds its guard around these) -------------------------
    def reserve(self, call: Call, demand: Demand) -> None:
        with self._lock:
            self._release(call)
            self._held[id(call)] = demand
            for dev in demand.devices:
                self._reserved[dev] = self._reserved.get(dev, 0) + demand.per_device

    def holds(self, call: Call) -> Demand | None:
        with self._lock:
            return self._held.get(id(call))

    def release(self, call: Call) -> None:
        with self._lock:
            self._release(call)

    def _release(self, call: Call) -> None:
        demand = self._held.pop(id(call), None)
        if demand is None:
            return
        for dev in demand.devices:
            left = self._reserved.get(dev, 0) - demand.per_device
            if left > 0:
                self._reserved[dev] = left
            else:
                self._reserved.pop(dev, None)

    def reserved(self) -> dict[int, int]:
        with self._lock:
            return dict(self._reserved)

    # -- messages ---------------------------------------------------------------------------
    def never_fits(self, call: Call, demand: Demand, verdict: Verdict) -> DeviceMemoryError:
        return DeviceMemoryError(_MSG_NEVER_FITS.format(
            kind=call.kind, id=call.id, need=size(verdict.need), device=verdict.device,
            detail=demand.describe(), limit=size(verdict.limit), source=verdict.source),
            estimate_bytes=demand.per_device, free_bytes=verdict.free, device=verdict.device)

    def no_room(self, call: Call, demand: Demand, verdict: Verdict, now: float
                ) -> DeviceMemoryError:
        assert call.deadline is not None
        return DeviceMemoryError(_MSG_NO_ROOM.format(
            kind=call.kind, id=call.id, timeout=call.deadline - call.created,
            need=size(verdict.need), device=verdict.device, detail=demand.describe(),
            free=size(verdict.free), limit=size(verdict.limit), source=verdict.source,
            reserved=size(verdict.reserved), waited=now - call.created,
            largest=self.largest(verdict.device)),
            estimate_bytes=demand.per_device, free_bytes=verdict.free, device=verdict.device)

    def largest(self, device: int | None, count: int = 3) -> str:
        """The ``count`` largest states resident on ``device``, in words."""
        found = []
        for _, label, value in self._resident():
            n = device_bytes(value).get(device, 0) if device is not None else 0
            if n:
                found.append((n, label))
        found.sort(key=lambda item: -item[0])
        if not found:
            return "none"
        return ", ".join(f"{label} ({size(n)})" for n, label in found[:count])


def out_of_memory(exc: BaseException, where: str, demand: Demand | None) -> DeviceMemoryError:
    """The ``DeviceMemoryError`` of a call that XLA ran out of memory for."""
    text = str(exc).removeprefix("RESOURCE_EXHAUSTED:").strip().split("\n", 1)[0]
    estimate = "" if demand is None else (
        f"Its estimate was {size(demand.per_device)} per device ({demand.describe()}). ")
    return DeviceMemoryError(
        _MSG_XLA_OOM.format(where=where, text=text, estimate=estimate),
        estimate_bytes=None if demand is None else demand.per_device, free_bytes=None,
        device=None)


def memory_stats(device: Any) -> dict[str, Any]:
    """``device.memory_stats()``, or ``{}`` where the platform reports none (CPU devices
    and some plugins return None or raise). The one place the server asks; ``/v1/info``
    and the dashboard read it too."""
    try:
        return device.memory_stats() or {}
    except Exception:
        return {}


def _stats(device: Any) -> dict[str, Any] | None:
    return memory_stats(device) or None


def _limit(device: Any) -> int | None:
    stats = _stats(device)
    return None if stats is None else stats.get("bytes_limit")
