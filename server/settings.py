"""Server settings: one frozen object, built from ``STATEHOST_*`` variables and CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from statehost.server.persistence.durability import Durability

__all__ = ["Settings", "default_data_dir", "is_loopback", "parse_size", "parse_weight",
           "resolve_data_dir"]

_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str | int) -> int:
    """``"4GiB"`` -> 4294967296; plain integers are bytes."""
    if isinstance(text, int):
        return text
    raw = text.strip().upper().replace(" ", "")
    digits = raw.rstrip("KMGTIB")
    unit = raw[len(digits):]
    if not digits or unit not in _UNITS:
        raise ValueError(
            f"statehost settings: size {text!r} is not understood. "
            "Fix: write bytes (4294967296) or a number with a unit (4GiB, 512MiB, 100MB)."
        )
    return int(float(digits) * _UNITS[unit])


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/statehost``, else ``~/.local/share/statehost``.

    As the XDG base directory spec says, an empty or relative ``XDG_DATA_HOME`` is ignored.
    """
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "statehost"


def resolve_data_dir(flag: Path | None, env: Mapping[str, str] | None = None
                     ) -> tuple[Path, str]:
    """The data directory a command uses, and where that choice came from (for messages):
    ``--data-dir``, then ``STATEHOST_DATA_DIR``, then ``$XDG_DATA_HOME/statehost``, then
    ``~/.local/share/statehost``."""
    env = os.environ if env is None else env
    if flag is not None:
        return Path(flag).expanduser(), "--data-dir"
    if env.get("STATEHOST_DATA_DIR"):
        return Path(env["STATEHOST_DATA_DIR"]).expanduser(), "STATEHOST_DATA_DIR"
    if os.path.isabs(env.get("XDG_DATA_HOME", "")):
        return default_data_dir(env), "$XDG_DATA_HOME/statehost"
    return default_data_dir(env), "the default, ~/.local/share/statehost"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the server reads at start.

    Each field can be set from the environment as ``STATEHOST_<FIELD>`` (upper
    case); ``tokens`` is comma-separated. CLI flags override the environment.

    Arguments:
        host, port: where uvicorn listens (loopback by default).
        cpu_devices: virtual CPU devices to provision when no accelerator exists.
        data_dir: where the server keeps its files (:func:`default_data_dir` by default:
            ``$XDG_DATA_HOME/statehost``, else ``~/.local/share/statehost``).
        tokens: accepted bearer tokens; empty means "generate one at start".
        insecure: allow a non-loopback host with no tokens configured.
        max_body: request bodies larger than this get 413 (bytes).
        session_ttl: seconds after which an idle session and its states are freed.
        workers: threads running device work.
        session_workers: the most workers one session's calls may hold at once; its other
            calls wait in the queue (holding no thread). ``None``: ``max(1, workers // 2)``.
        call_timeout: the deadline, in seconds from its arrival, of a call that sets none of
            its own: one still queued then is dropped (``CallTimeoutError``), one running is
            asked to stop at its next step (0: no default deadline).
        stuck_after: a call running longer than this (seconds) is listed as stuck in
            ``/v1/info`` and counted in the ``statehost_calls_stuck`` metric.
        function_cache_size: unpickled callables kept, least recently used evicted.
        durability: default durability of new namespaces: sync, interval or none.
        flush_interval: seconds between flushes of dirty named states (``interval``).
        max_unflushed_commits: while writing a namespace's states to disk fails, new commits
            are refused once one of its states is this many commits ahead of its disk copy.
        json_max_elements: largest array the JSON API answers as nested lists.
        shutdown_grace: seconds SIGTERM waits for running calls; calls still running then
            are abandoned and the server exits with status 4.
        compile_cache: keep JAX's persistent compilation cache in
            ``<data_dir>/compile-cache``, so a restart does not recompile
            (``STATEHOST_COMPILE_CACHE=0`` turns it off).
        unix: a Unix socket to serve on besides TCP, for clients on this host: a path,
            ``auto`` ($XDG_RUNTIME_DIR/statehost/statehost.sock when $XDG_RUNTIME_DIR
            exists) or ``off`` (see ``server/unix_socket.py``).
        shared_memory: over the Unix socket, move array buffers of at least
            ``shared_memory_threshold`` bytes in shared memory instead of the byte stream
            (``STATEHOST_SHARED_MEMORY=0`` turns it off; ``server/shared_memory.py``).
        shared_memory_threshold: the smallest buffer that goes by shared memory (1MiB).
        device_memory: bytes of memory per device that calls are admitted against, where
            the platform does not report its own (``device.memory_stats()``; CPU does not).
            ``None``: no admission on such devices.
        namespace_weight: the default weight of a namespace's queue: in each round of the
            fair scheduler a namespace starts up to this many calls before the next one.
        namespace_weights: ``(namespace, weight)`` pairs overriding the default
            (``STATEHOST_NAMESPACE_WEIGHTS=team-a=3,team-b=1``).
        default_max_bytes, default_max_bytes_per_device, default_max_sessions,
            default_max_queued: the quotas of a namespace that sets none of its own
            (``statehost namespace set``; ``server/quotas.py``); None: no limit.
        coordinator, num_processes, process_id: a ``jax.distributed`` group of server
            processes (``server/cluster.py``): the coordinator's ``HOST:PORT``, the number
            of processes and this one's index (0 leads and serves clients).
        cluster: ``auto``: join the group ``jax.distributed.initialize()`` detects by
            itself (SLURM, Kubernetes, TPU pods); ``off`` (default): only with the flags.
        heartbeat_timeout: seconds without a heartbeat after which the leader holds a
            follower lost (followers send one every ``heartbeat_timeout / 4`` s, at most 0.5).
        cluster_port: the leader's port for its followers' operation stream (0: any free
            port; followers find it in the coordination service's key-value store).
        dispatch_window: the most programs the server's devices may still be working on;
            the next one waits for the oldest (``server/dispatch_window.py``: XLA's CPU
            devices abort the process when a few dozen collective programs queue up).
    """

    host: str = "127.0.0.1"
    port: int = 8470
    cpu_devices: int = 8
    data_dir: Path = dataclasses.field(default_factory=default_data_dir)
    tokens: tuple[str, ...] = ()
    insecure: bool = False
    max_body: int = 4 * 2**30
    session_ttl: float = 3600.0
    workers: int = 4
    session_workers: int | None = None
    call_timeout: float = 3600.0
    stuck_after: float = 60.0
    function_cache_size: int = 256
    durability: Durability = Durability.INTERVAL
    flush_interval: float = 5.0
    max_unflushed_commits: int = 1000
    json_max_elements: int = 1_000_000
    shutdown_grace: float = 30.0
    compile_cache: bool = True
    unix: str = "auto"
    shared_memory: bool = True
    shared_memory_threshold: int = 1 << 20
    device_memory: int | None = None
    namespace_weight: int = 1
    namespace_weights: tuple[tuple[str, int], ...] = ()
    default_max_bytes: int | None = None
    default_max_bytes_per_device: int | None = None
    default_max_sessions: int | None = None
    default_max_queued: int | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str = "off"
    heartbeat_timeout: float = 5.0
    cluster_port: int = 0
    dispatch_window: int = 8

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``STATEHOST_*`` variables, then ``overrides`` (None means unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"STATEHOST_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("data_dir", default_data_dir(env))
        return cls(**values)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        object.__setattr__(self, "tokens", tuple(t for t in self.tokens if t))
        if self.cpu_devices < 1:
            raise ValueError(f"statehost settings: cpu_devices={self.cpu_devices} must be >= 1.")
        if self.max_body < 1:
            raise ValueError(f"statehost settings: max_body={self.max_body} must be positive.")
        if not Durability.is_valid(self.durability):
            raise ValueError(f"statehost settings: durability={self.durability!r} must be one "
                             f"of {Durability.choices()}.")
        object.__setattr__(self, "durability", Durability(self.durability))
        if self.flush_interval <= 0:
            raise ValueError(f"statehost settings: flush_interval={self.flush_interval} must "
                             "be > 0.")
        if self.max_unflushed_commits < 1:
            raise ValueError(f"statehost settings: max_unflushed_commits="
                             f"{self.max_unflushed_commits} must be >= 1.")
        if self.session_ttl <= 0:
            raise ValueError(f"statehost settings: session_ttl={self.session_ttl} must be > 0.")
        if self.workers < 1:
            raise ValueError(f"statehost settings: workers={self.workers} must be >= 1.")
        if self.dispatch_window < 1:
            raise ValueError(f"statehost settings: dispatch_window={self.dispatch_window} "
                             "must be >= 1 (the programs the devices may run behind the "
                             "server; 8 by default).")
        if self.session_workers is None:
            object.__setattr__(self, "session_workers", max(1, self.workers // 2))
        elif self.session_workers < 1:
            raise ValueError(f"statehost settings: session_workers={self.session_workers} "
                             "must be >= 1 (it bounds the workers one session may hold; "
                             "unset it for max(1, workers // 2)).")
        if not self.call_timeout >= 0:
            raise ValueError(f"statehost settings: call_timeout={self.call_timeout} must be "
                             ">= 0 seconds (0: no default deadline).")
        if not self.stuck_after > 0:
            raise ValueError(f"statehost settings: stuck_after={self.stuck_after} must be "
                             "> 0 seconds.")
        if self.shutdown_grace < 0:
            raise ValueError(f"statehost settings: shutdown_grace={self.shutdown_grace} must "
                             "be >= 0.")
        if self.shared_memory_threshold < 1:
            raise ValueError(f"statehost settings: shared_memory_threshold="
                             f"{self.shared_memory_threshold} must be a positive size (1MiB); "
                             "turn shared memory off with STATEHOST_SHARED_MEMORY=0 instead.")
        if self.device_memory is not None and self.device_memory < 1:
            raise ValueError(f"statehost settings: device_memory={self.device_memory} must be "
                             "a positive size (64MiB, 8GiB); unset it for no admission on "
                             "devices that do not report their memory.")
        object.__setattr__(self, "namespace_weights", tuple(
            (str(ns), int(w)) for ns, w in dict(self.namespace_weights).items()))
        for ns, weight in ((None, self.namespace_weight), *self.namespace_weights):
            if weight < 1:
                what = "namespace_weight" if ns is None else f"namespace_weights[{ns!r}]"
                raise ValueError(f"statehost settings: {what}={weight} must be an integer "
                                 ">= 1 (the calls a namespace starts per round).")
        for name, least in (("default_max_bytes", 0), ("default_max_bytes_per_device", 0),
                            ("default_max_sessions", 1), ("default_max_queued", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"statehost settings: {name}={value} must be >= {least} "
                                 "(unset it for no limit).")
        self._check_cluster()

    @property
    def in_group(self) -> bool:
        """Whether this server is one process of a ``jax.distributed`` group."""
        return self.coordinator is not None or self.cluster == "auto" or \
            (self.num_processes or 1) > 1

    def _check_cluster(self) -> None:
        """The group flags (``server/cluster.py``); a group runs its device work on one
        worker, so that every process runs the same operations in the same order."""
        if self.cluster not in {"off", "auto"}:
            raise ValueError(f"statehost settings: cluster={self.cluster!r} must be 'off' or "
                             "'auto' (jax.distributed.initialize()'s own detection of SLURM, "
                             "Kubernetes or TPU pods); for a group of your own, pass "
                             "--coordinator HOST:PORT --num-processes N --process-id I.")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"statehost settings: num_processes={self.num_processes} must "
                             "be >= 1.")
        if self.process_id is not None and not 0 <= self.process_id < (
                self.num_processes or 1):
            raise ValueError(f"statehost settings: process_id={self.process_id} must be in "
                             f"0..{(self.num_processes or 1) - 1} (one per process of the "
                             "group, 0 for the leader).")
        if (self.num_processes or 1) > 1 and (self.coordinator is None) != (
                self.process_id is None):
            raise ValueError("statehost settings: a group of processes needs --coordinator "
                             "HOST:PORT and --process-id I together (or neither, with "
                             "--cluster auto).")
        if not self.heartbeat_timeout > 0:
            raise ValueError(f"statehost settings: heartbeat_timeout={self.heartbeat_timeout} "
                             "must be > 0 seconds.")
        if self.in_group:
            object.__setattr__(self, "workers", 1)
            object.__setattr__(self, "session_workers", 1)

    def weight_of(self, namespace: str) -> int:
        """The fair scheduler's weight of ``namespace``'s queue."""
        return dict(self.namespace_weights).get(namespace, self.namespace_weight)


def parse_weight(text: str) -> tuple[str, int]:
    """``"team-a=3"`` -> ``("team-a", 3)`` (a ``--namespace-weight`` value)."""
    namespace, sep, weight = text.rpartition("=")
    try:
        if not sep or not namespace:
            raise ValueError
        return namespace, int(weight)
    except ValueError:
        raise ValueError(
            f"statehost settings: namespace weight {text!r} is not NAMESPACE=WEIGHT. "
            "Fix: write it as team-a=3 (several: team-a=3,team-b=1 in "
            "STATEHOST_NAMESPACE_WEIGHTS, or repeat --namespace-weight).") from None


def _convert(name: str, raw: str) -> Any:
    try:
        if name == "tokens":
            return tuple(t.strip() for t in raw.split(",") if t.strip())
        if name in {"insecure", "compile_cache", "shared_memory"}:
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError("expected true or false")
            return raw.lower() in {"1", "true", "yes"}
        if name in {"max_body", "device_memory", "default_max_bytes",
                    "default_max_bytes_per_device", "shared_memory_threshold"}:
            return parse_size(raw)
        if name == "namespace_weights":
            return tuple(parse_weight(part.strip()) for part in raw.split(",") if part.strip())
        if name in {"default_max_sessions", "default_max_queued", "num_processes",
                    "process_id", "cluster_port"}:
            return int(raw)
        if name == "heartbeat_timeout":
            return float(raw)
        if name in {"port", "cpu_devices", "workers", "function_cache_size",
                    "json_max_elements", "max_unflushed_commits", "session_workers",
                    "namespace_weight", "dispatch_window"}:
            return int(raw)
        if name in {"session_ttl", "flush_interval", "shutdown_grace", "call_timeout",
                    "stuck_after"}:
            return float(raw)
        return raw
    except ValueError as exc:
        raise ValueError(
            f"statehost settings: STATEHOST_{name.upper()}={raw!r} is invalid ({exc}). "
            "Fix the variable or unset it."
        ) from exc
