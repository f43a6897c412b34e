"""Prometheus metrics of one server (one registry per app, so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "statehost_calls", "Calls by outcome (ok, user_error, bad_request, ...).",
            ["outcome"], registry=r,
        )
        self.call_seconds = Histogram(
            "statehost_call_seconds", "Wall time of /v1/call on the server.",
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.compiles = Counter(
            "statehost_compiles", "Programs a call needed, by where they came from: 'fresh' "
            "(traced and compiled), 'persistent' (traced, the executable read from JAX's "
            "compilation cache on disk), 'shared' (another session's, same code: no trace, "
            "no compile).", ["source"], registry=r,
        )
        self.function_cache = Counter(
            "statehost_function_cache", "Callable cache lookups.", ["result"], registry=r
        )
        self.wire_bytes = Counter(
            "statehost_wire_bytes", "Frame bytes by direction (in/out) and part.",
            ["direction", "part"], registry=r,
        )
        self.shared_memory_bytes = Counter(
            "statehost_shared_memory_bytes", "Array bytes that went by shared memory over the "
            "Unix socket, by direction (in/out); statehost_wire_bytes does not count them.",
            ["direction"], registry=r,
        )
        self.resident_bytes = Gauge(
            "statehost_resident_state_bytes", "Bytes of state values held on the devices.",
            registry=r,
        )
        self.namespace_bytes = Gauge(
            "statehost_namespace_state_bytes", "Bytes of named state values per namespace.",
            ["namespace"], registry=r,
        )
        self.resident_states = Gauge(
            "statehost_resident_states", "States held on the devices.", registry=r
        )
        self.sessions = Gauge("statehost_sessions", "Open client sessions.", registry=r)
        self.flush_failures = Counter(
            "statehost_flush_failures", "Writes of named states to disk that failed (a flush "
            "or a sync commit); /v1/health says 'degraded' until they succeed.", registry=r,
        )
        self.queue_depth = Gauge(
            "statehost_queue_depth", "Calls waiting for a worker or a state lock.", registry=r
        )
        self.session_calls = Gauge(
            "statehost_session_calls", "Calls queued or running per session (the session id's "
            "first 8 characters; 'server' for the server's own work such as flushes).",
            ["session", "status"], registry=r,
        )
        self.calls_stuck = Gauge(
            "statehost_calls_stuck", "Calls running longer than stuck_after or past their "
            "deadline (GET /v1/info lists them).", registry=r,
        )
        self.call_cancellations = Counter(
            "statehost_call_cancellations", "Cancel requests that took effect: 'queued' ones "
            "never started, 'running' ones were asked to stop at their next step.", ["when"],
            registry=r,
        )
        self.call_timeouts = Counter(
            "statehost_call_timeouts", "Calls dropped at their deadline before they started "
            "(CallTimeoutError).", registry=r,
        )
        self.call_queue_seconds = Histogram(
            "statehost_call_queue_seconds", "Time from a call's arrival to its start (waiting "
            "for a worker, its session's turn or its states).",
            buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900,
                     3600),
            registry=r,
        )
        self.jobs = Gauge(
            "statehost_jobs", "Jobs (server-side loops) by status: queued, running, "
            "completed, failed, cancelled (finished ones as long as the server keeps them).",
            ["status"], registry=r,
        )
        self.namespace_queue_seconds = Histogram(
            "statehost_namespace_queue_seconds", "Time from a call's arrival to its start, per "
            "namespace of the fair scheduler (the caller's namespace; '(operator)' for operator "
            "tokens, '(server)' for the server's own work).", ["namespace"],
            buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900,
                     3600),
            registry=r,
        )
        self.ledger_bytes = Gauge(
            "statehost_ledger_bytes", "Bytes the states charged to a namespace (its named "
            "states and its sessions' anonymous ones) hold on each device: the byte ledger "
            "that quotas limit.", ["namespace", "device"], registry=r,
        )
        self.device_state_bytes = Gauge(
            "statehost_device_state_bytes", "Bytes of resident states on each device (every "
            "namespace and session).", ["device"], registry=r,
        )
        self.group_processes = Gauge(
            "statehost_group_process_up", "A server group's processes (server/cluster.py): "
            "1 while the process follows (the leader: always), 0 once it is lost or before "
            "it joined; no samples on a single-process server.", ["process"], registry=r,
        )
        self.cluster_broadcast_bytes = Counter(
            "statehost_cluster_broadcast_bytes_total", "Bytes a server group's leader sent "
            "its followers (server/cluster.py), per follower: each operation and its wire "
            "message; no samples on a single-process server.", ["process"], registry=r,
        )
