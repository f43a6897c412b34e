"""The group's pieces that need no second process (server/cluster.py): its settings, the
operation framing, and the leader's view of its followers (their heartbeats and loss).
The whole group runs in tests/e2e/test_cluster.py."""

import socket
import threading

import numpy as np
import pytest

from statehost.server.cluster import (
    ClusterOp,
    Leader,
    check_mirrored,
    encode_shards,
    read_message,
    send_message,
)
from statehost.server.errors import ClusterUnavailableError, GroupUnsupportedError
from statehost.server.settings import Settings
from statehost.wire import PullRequest


def test_a_group_is_read_from_the_environment_and_runs_one_worker(tmp_path):
    env = {"STATEHOST_COORDINATOR": "10.0.0.1:8476", "STATEHOST_NUM_PROCESSES": "2",
           "STATEHOST_PROCESS_ID": "1", "STATEHOST_HEARTBEAT_TIMEOUT": "2.5",
           "STATEHOST_DATA_DIR": str(tmp_path)}
    settings = Settings.from_env(env)

    assert (settings.coordinator, settings.num_processes, settings.process_id) == \
        ("10.0.0.1:8476", 2, 1)
    assert settings.in_group and settings.heartbeat_timeout == 2.5
    assert (settings.workers, settings.session_workers) == (1, 1)
    single = Settings(data_dir=tmp_path)
    assert not single.in_group and single.workers == 4  # one process: unchanged


@pytest.mark.parametrize(("fields", "match"), [
    ({"cluster": "slurm"}, "must be 'off' or 'auto'"),
    ({"num_processes": 2, "process_id": 2, "coordinator": "h:1"}, r"must be in 0\.\.1"),
    ({"num_processes": 2, "process_id": 1}, "needs --coordinator HOST:PORT and --process-id"),
    ({"num_processes": 0}, "num_processes=0 must be >= 1"),
    ({"heartbeat_timeout": 0.0}, "heartbeat_timeout=0.0 must be > 0"),
])
def test_bad_group_settings_say_what_to_pass(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        Settings(data_dir=tmp_path, **fields)


def test_a_kind_of_call_not_run_on_every_process_is_refused_in_a_group():
    check_mirrored("loop", "POST /v1/jobs")  # loops and jobs run on every process

    with pytest.raises(GroupUnsupportedError,
                       match="POST /v1/x: work is not supported on a server spanning several"):
        check_mirrored("work", "POST /v1/x")


def test_an_operation_travels_with_its_wire_message():
    a, b = socket.socketpair()
    with a, b:
        message = PullRequest(session="s" * 32, ids=("a" * 32,))
        op = ClusterOp("pull", 7, "s" * 32, "call-1", ("a" * 32,), {}, "PullRequest")
        sender = threading.Thread(target=send_message, args=(a, op, message.to_frame()))
        sender.start()
        got, data = read_message(b)
        sender.join()

    from statehost.wire import decode

    assert got == op
    assert PullRequest.from_frame(decode(data)) == message


def _leader(tmp_path, count=2, timeout=0.2):
    return Leader(Settings(data_dir=tmp_path, heartbeat_timeout=timeout), count)


def test_a_forming_group_refuses_work_until_every_follower_joined(tmp_path):
    leader = _leader(tmp_path)

    assert leader.problem() == "forming: 0 of 1 follower(s) connected"
    with pytest.raises(ClusterUnavailableError, match="still forming .0 of 1 follower"):
        leader.check("POST /v1/call")


def test_a_silent_follower_is_lost_after_the_heartbeat_bound(tmp_path):
    """Its connection stays open (a stopped process), but no heartbeat comes."""
    from statehost.server import cluster

    lost = threading.Event()
    errors = []
    leader = _leader(tmp_path)
    leader.on_lost = lambda error: (errors.append(error), lost.set())
    ours, theirs = socket.socketpair()
    with ours, theirs:
        follower = cluster._Follower(1, ours, last_seen=0.0)
        leader.followers[1] = follower
        threading.Thread(target=leader._read, args=(follower,), daemon=True).start()
        threading.Thread(target=leader._monitor, daemon=True).start()
        assert lost.wait(30)
        leader._closed.set()

    assert "no heartbeat for" in follower.lost and "0.2 s bound" in follower.lost
    assert errors[0].extra["processes"] == [1]
    with pytest.raises(ClusterUnavailableError, match="process 1 of this server's group of 2 "
                       "is lost .no heartbeat"):
        leader.broadcast("call", "s" * 32)
    assert [p["health"] for p in leader.processes()] == ["ok", "lost"]


def test_a_closed_connection_is_an_immediate_loss(tmp_path):
    from statehost.server import cluster

    lost = threading.Event()
    leader = _leader(tmp_path, timeout=3600.0)
    leader.on_lost = lambda error: lost.set()
    ours, theirs = socket.socketpair()
    follower = cluster._Follower(1, ours, last_seen=float(np.inf))
    leader.followers[1] = follower
    threading.Thread(target=leader._read, args=(follower,), daemon=True).start()
    send_message(theirs, {"ops": 3, "failed": 0})  # a heartbeat, then the process dies
    theirs.close()

    assert lost.wait(30)
    assert "its connection closed" in follower.lost
    assert follower.status == {"ops": 3, "failed": 0}
    ours.close()


def _shards_leader(tmp_path, timeout=3600.0):
    """A leader with one follower on a socket pair (ours: the leader's end), read by the
    leader's reader thread, as in a group."""
    from statehost.server import cluster

    leader = _leader(tmp_path, timeout=timeout)
    ours, theirs = socket.socketpair()
    follower = cluster._Follower(1, ours, last_seen=float(np.inf))
    leader.followers[1] = follower
    threading.Thread(target=leader._read, args=(follower,), daemon=True).start()
    return leader, follower, theirs


def test_a_followers_shards_reach_the_leaders_gather_in_order(tmp_path):
    """Its shards of the op the leader gathers for; those of an older op (which failed on
    the leader before its gather) are dropped."""
    leader, _, theirs = _shards_leader(tmp_path)
    stale = [[((slice(0, 1),), np.zeros(1, np.float32))]]
    wanted = [[((slice(4, 8), slice(None)), np.arange(8, dtype=np.int32).reshape(4, 2))],
              [((), np.float32(3.5) * np.ones((), np.float32))]]
    with theirs:
        for parts, seq in ((stale, 4), (wanted, 5)):
            send_message(theirs, *encode_shards(parts, seq))
        leader._local.seq = 5  # this thread broadcast op 5 last
        (got,) = leader.receive()

    assert [[index for index, _ in leaf] for leaf in got] == [[(slice(4, 8), slice(None))],
                                                               [()]]
    np.testing.assert_array_equal(got[0][0][1], wanted[0][0][1])
    assert got[1][0][1] == 3.5 and got[1][0][1].dtype == np.float32


def test_shards_of_a_later_op_say_the_follower_skipped_a_gather(tmp_path):
    leader, _, theirs = _shards_leader(tmp_path)
    with theirs:
        send_message(theirs, *encode_shards([], 9))
        leader._local.seq = 7
        with pytest.raises(RuntimeError, match="process 1 sent its shards of operation 9 "
                           "while the leader gathers the results of operation 7"):
            leader.receive()


def test_a_lost_follower_ends_the_leaders_wait_for_its_shards(tmp_path):
    leader, follower, theirs = _shards_leader(tmp_path)
    leader._local.seq = 1
    theirs.close()  # it dies before sending them

    with pytest.raises(ClusterUnavailableError, match="process 1 of this server's group of "
                       "2 is lost .its connection closed"):
        leader.receive()
    assert follower.lost is not None


def test_a_follower_that_failed_the_op_ends_the_leaders_wait_with_its_reason(tmp_path):
    leader, _, theirs = _shards_leader(tmp_path)
    with theirs:
        send_message(theirs, {"shards": 3, "parts": [], "failed": "MemoryError: no room"})
        leader._local.seq = 3
        with pytest.raises(RuntimeError, match="process 1 failed operation 3 where the "
                           "leader did not .MemoryError: no room."):
            leader.receive()
