"""Shared memory over the Unix socket: large array buffers go in memory files passed with
SCM_RIGHTS, not through the byte stream (``server/shared_memory.py``).

A real server (module scope) gives the same results by shared memory as over TCP, and
its metrics show which path the bytes took; one with shared memory off says why and
gives the same results through the stream. The channel refuses callers without the
token before mapping anything (in-process: the app, its channel socket and the real
client channel in this process). A client killed in the middle of an upload, and a
server killed in the middle of a pull, leave no memory file in the survivor (its
``/proc/<pid>/fd`` and ``/proc/<pid>/maps``) and nothing in ``/dev/shm``.
"""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost._errors import WireError
from statehost.client import ProtocolError, TransportError
from statehost.client._shared_memory import SharedMemoryChannel
from statehost.server import Settings, create_app
from statehost.server.persistence import Database
from statehost.server.shared_memory import SharedMemory
from statehost.server.testing import InProcessTransport
from statehost.wire import (
    CONTENT_TYPE,
    PullRequest,
    PushRequest,
    StateRecord,
    decode,
    pack,
)
from statehost.wire._shared_memory import Arena, PeerArena, receive, send
from tests.serving import running_server

MIB = 1 << 20
TOKEN = "shm-token"


def _memfds(pid="self"):
    """Descriptors of statehost memory files open in ``pid``."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:statehost"):
                fds.append(fd)
        except OSError:  # closed meanwhile (listdir's own descriptor)
            pass
    return fds


def _mapped(pid="self"):
    """Mappings of statehost memory files in ``pid``."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "/memfd:statehost" in line]


def _until(condition, what, timeout=20.0):
    """Waits for another process to reach ``condition()`` (a server's thread noticing a
    closed connection): there is no event to await across processes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _dev_shm():
    return set(os.listdir("/dev/shm"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shm")
    with running_server(tmp, "--unix", str(tmp / "run" / "statehost.sock"),
                        token=TOKEN) as served:
        yield served


def _work(client):
    """A call with a 2 MiB argument and state, a push/pull and a put/get of 2 MiB; the
    results."""
    rng = np.random.default_rng(0)
    w = statehost.ParamState(jnp.asarray(rng.standard_normal((8, 65536), np.float32)))
    step = client.pmap(lambda d: (setattr(w, "value", w.value * 2 + d), w.value[:4])[1],
                       axis_name="i", in_axes=0, out_axes=0,
                       state_in_axes={0: statehost.util.filter.OfType(statehost.ParamState)},
                       state_out_axes={0: statehost.util.filter.OfType(statehost.ParamState)})
    out = np.asarray(step(rng.standard_normal((8, 65536), np.float32)))
    client.sync()
    after_call = np.asarray(w.value)
    big = statehost.ParamState(jnp.asarray(rng.standard_normal(2 * MIB // 4, np.float32)))
    client.push(big)
    big.value = jnp.zeros_like(big.value)
    client.pull(big)
    name = f"team/shm-{os.getpid()}-{id(client)}"
    client.put(name, big)
    back = client.get(name)
    return out, after_call, np.asarray(big.value), np.asarray(back.value)


@pytest.fixture(scope="module")
def on_tcp(served):
    """``_work``'s results over TCP, which every other path must give."""
    with statehost.connect(served.url, token=TOKEN) as tcp:
        tcp._http.use_unix(None)  # stay on TCP, for the comparison
        assert tcp._http.shared_memory is None
        results = _work(tcp)
    counted = {d: served.metric("statehost_shared_memory_bytes_total", direction=d)
               for d in ("in", "out")}
    assert counted == {"in": 0.0, "out": 0.0}  # TCP moved every byte in the stream
    return results


def test_shared_memory_gives_what_tcp_gives_and_skips_the_byte_stream(served, on_tcp):
    info = httpx.get(f"{served.url}/v1/info", headers={"authorization": f"Bearer {TOKEN}"}
                     ).json()["shared_memory"]
    assert info["enabled"] and info["threshold"] == MIB and info["socket"].endswith(".shm")
    wire = {d: served.metric("statehost_wire_bytes_total", direction=d, part="state")
            for d in ("in", "out")}
    with statehost.connect(served.url, token=TOKEN) as client:
        assert client.via.startswith("unix://")
        assert client._http.shared_memory is not None, client._http.shared_memory_why
        on_shm = _work(client)
    for a, b in zip(on_shm, on_tcp, strict=True):
        np.testing.assert_array_equal(a, b)
    moved = {d: served.metric("statehost_shared_memory_bytes_total", direction=d)
             for d in ("in", "out")}
    # in: the call's argument and state, the push; out: the call's state, pull and get
    assert moved["in"] >= 3 * 2 * MIB and moved["out"] >= 3 * 2 * MIB, moved
    stream = {d: served.metric("statehost_wire_bytes_total", direction=d, part="state")
              - wire[d] for d in ("in", "out")}
    assert 0 < stream["in"] < MIB and 0 < stream["out"] < MIB, stream  # pickles only
    assert "Traceback" not in served.output()


def test_a_channel_the_server_closed_is_opened_anew(served):
    with statehost.connect(served.url, token=TOKEN) as client:
        old = client._http.shared_memory
        old.sock.shutdown(socket.SHUT_RDWR)  # reads as a stopped server's channel does
        state = statehost.ParamState(np.arange(MIB // 2, dtype=np.float32))  # 2 MiB
        client.push(state)
        state.value = jnp.zeros_like(state.value)
        client.pull(state)
        np.testing.assert_array_equal(np.asarray(state.value), np.arange(MIB // 2))
        assert client._http.shared_memory is not old and client._http.shared_memory.alive()


def test_with_shared_memory_off_the_stream_gives_the_same_and_info_says_why(tmp_path, on_tcp):
    with running_server(tmp_path, "--unix", str(tmp_path / "run" / "s.sock"), token=TOKEN,
                        env={"STATEHOST_SHARED_MEMORY": "0"}) as off:
        with statehost.connect(off.url, token=TOKEN) as client:
            assert client.via.startswith("unix://")
            info = client.server_info["shared_memory"]
            assert info["enabled"] is False and "STATEHOST_SHARED_MEMORY=0" in info["why"]
            assert client._http.shared_memory is None
            assert "the server has it off" in client._http.shared_memory_why
            results = _work(client)
        assert off.metric("statehost_shared_memory_bytes_total", direction="in") == 0.0
        assert off.metric("statehost_wire_bytes_total", direction="in", part="state") > MIB
        assert "shared memory: off, turned off (STATEHOST_SHARED_MEMORY=0)" in off.output()
    for a, b in zip(results, on_tcp, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_settings():
    settings = Settings.from_env({"STATEHOST_SHARED_MEMORY": "0",
                                  "STATEHOST_SHARED_MEMORY_THRESHOLD": "2MiB"})
    assert settings.shared_memory is False and settings.shared_memory_threshold == 2 * MIB
    with pytest.raises(ValueError, match="shared_memory_threshold=0 must be a positive size"):
        Settings(shared_memory_threshold=0)


# -- the channel, in-process ----------------------------------------------------------------
@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The app with its channel socket, in this process; ``(transport, service, db)``."""
    tmp = tmp_path_factory.mktemp("shm-local")
    app = create_app(Settings(tokens=(TOKEN,), data_dir=tmp / "data"))
    transport = InProcessTransport(app)
    run = tmp / "run"
    run.mkdir(mode=0o700)
    service = SharedMemory.start(app.state.settings, run / "s.sock", app)
    assert service.enabled, service.why
    app.state.shared_memory = service
    db = Database(tmp / "data" / "statehost.db")
    yield transport, service, db
    db.close()
    service.close()
    transport.shutdown()


def _raw_channel(service):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(str(service.path))
    return sock


@pytest.mark.parametrize("first", [
    {"op": "auth"}, {"op": "auth", "token": "wrong"}, {"op": "arena", "id": "x", "size": 4096},
], ids=["no-token", "wrong-token", "arena-first"])
def test_the_channel_refuses_a_caller_without_the_token_and_maps_nothing(local, first):
    _, service, _ = local
    fd = os.memfd_create("statehost-evil")
    os.ftruncate(fd, 4096)
    try:
        with _raw_channel(service) as sock:
            socket.send_fds(sock, [json.dumps(first).encode()], [fd])
            answer = json.loads(sock.recv(65536))
            assert answer["op"] == "refused"
            assert "Send {\"op\": \"auth\", \"token\":" in answer["error"]
            assert sock.recv(65536) == b""  # and closed
        # The server closed its copy before answering, and mapped nothing.
        assert len([f for f in _memfds() if "evil" in os.readlink(f"/proc/self/fd/{f}")]) == 1
        assert not [line for line in _mapped() if "statehost-evil" in line]
    finally:
        os.close(fd)


def test_an_unsealed_or_short_arena_is_refused(local):
    _, service, _ = local
    with _raw_channel(service) as sock:
        sock.send(json.dumps({"op": "auth", "token": TOKEN}).encode())
        assert json.loads(sock.recv(65536))["op"] == "ok"
        fd = os.memfd_create("statehost-unsealed")
        os.ftruncate(fd, 4096)
        socket.send_fds(sock, [b'{"op":"arena","id":"c1","size":8192}'], [fd])
        os.close(fd)
        answer = json.loads(sock.recv(65536))
        assert answer["op"] == "arena-refused"
        assert "sealed against shrinking (F_SEAL_SHRINK)" in answer["error"]
    assert not [line for line in _mapped() if "statehost-unsealed" in line]


def test_a_channel_maps_at_most_64_arenas_and_refuses_a_wrong_token(local):
    _, service, _ = local
    with pytest.raises(TransportError, match="shared-memory channel .* refused this client"):
        SharedMemoryChannel(str(service.path), "wrong", 10.0)
    with _raw_channel(service) as sock:
        sock.send(json.dumps({"op": "auth", "token": TOKEN}).encode())
        assert json.loads(sock.recv(65536))["op"] == "ok"
        answers = []
        for n in range(65):
            arena = Arena(f"c{n}", 4096)
            socket.send_fds(sock, [json.dumps({"op": "arena", "id": arena.id,
                                               "size": 4096}).encode()], [arena.fd])
            arena.close()
            answers.append(json.loads(sock.recv(65536)))
        assert [a["op"] for a in answers] == ["arena-ok"] * 64 + ["arena-refused"]
        assert "already maps 64 arenas" in answers[-1]["error"]


def test_channel_packets_and_leases_are_checked():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        for packet, text in [(b"{", "is not JSON"), (b"[1]", "is not a channel message")]:
            left.send(packet)
            with pytest.raises(WireError, match=text):
                receive(right)
        fds = [os.memfd_create("statehost-many") for _ in range(17)]
        socket.send_fds(left, [b'{"op":"arena"}'], fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(WireError, match="more than 16 descriptors"):
            receive(right)
        assert not [f for f in _memfds() if "many" in os.readlink(f"/proc/self/fd/{f}")]
        arena = Arena("c1", 8192)
        send(left, {"op": "arena", "id": "c1", "size": 8192}, (arena.fd,))
        _, (fd,) = receive(right)
        mapped = PeerArena("c1", 8192, fd)
        with pytest.raises(WireError, match="a buffer of 8193 bytes is named in arena"):
            mapped.lease(8193, print)
        released = []
        view = mapped.lease(4096, released.append)
        with pytest.raises(WireError, match="is named again before it was released"):
            mapped.lease(4096, released.append)
        del view
        assert released == ["c1"]  # the last view gone, the arena goes back
        mapped.close()
        arena.close()


def test_an_answer_naming_an_arena_never_sent_is_refused(local):
    _, service, _ = local
    channel = SharedMemoryChannel(str(service.path), TOKEN, 0.2)
    try:
        with pytest.raises(WireError, match="names arena 's999', which the server never sent"):
            channel.attach("s999", 4096)
    finally:
        _close(channel, service)


def _post(transport, path, encoded, headers, token=TOKEN):
    with httpx.Client(base_url="http://statehost.test", transport=transport) as http:
        return http.post(path, content=encoded.to_bytes(), headers={
            "content-type": CONTENT_TYPE, "authorization": f"Bearer {token}", **headers})


def _session(transport, token=TOKEN):
    with httpx.Client(base_url="http://statehost.test", transport=transport) as http:
        return http.post("/v1/sessions",
                         headers={"authorization": f"Bearer {token}"}).json()["id"]


def _push_frame(session, value, state_id="ab" * 16):
    record = StateRecord(statehost.ParamState, state_id, "x", None, value)
    return PushRequest(session=session, uploads={state_id: None},
                       states=pack([record], refs=False)).to_frame()


def test_a_push_and_a_pull_through_the_channel_in_process(local):
    transport, service, _ = local
    channel = SharedMemoryChannel(str(service.path), TOKEN, 10.0)
    try:
        session = _session(transport)
        value = np.arange(MIB, dtype=np.float32)  # 4 MiB
        for round_ in range(3):  # the second and third reuse the arena the first made
            state_id = f"{round_ + 1:032x}"
            shared = channel.share(_push_frame(session, value + round_, state_id))
            assert shared.nbytes < 64 * 1024  # the bytes are in the arena
            assert _post(transport, "/v1/states/push", shared, channel.headers
                         ).status_code == 200
            answer = _post(transport, "/v1/states/pull", channel.share(PullRequest(
                session=session, ids=(state_id,)).to_frame()), channel.headers)
            assert answer.status_code == 200 and len(answer.content) < 64 * 1024
            values = decode(answer.content, channel.attach).sections["states"].load()
            np.testing.assert_array_equal(dict(values)[state_id], value + round_)
            del values
            channel.flush()
        assert len(channel._mine) == 1  # one arena, filled three times
        # Each state kept its own bytes: neither the arena nor the server's buffer of an
        # upload is reused while a value still lives in it.
        answer = _post(transport, "/v1/states/pull", channel.share(PullRequest(
            session=session, ids=tuple(f"{i + 1:032x}" for i in range(3))).to_frame()),
            channel.headers)
        values = dict(decode(answer.content, channel.attach).sections["states"].load())
        for round_ in range(3):
            np.testing.assert_array_equal(values[f"{round_ + 1:032x}"], value + round_)
        del values
    finally:
        _close(channel, service)


def test_without_the_copy_an_arena_a_value_lives_in_is_not_reused(local):
    """On an accelerator the server hands the request a view of the client's arena (no
    copy on CPU: ``device_put`` would keep the arena as the state's memory, as it does
    here once the copy is turned off): the arena then stays lent while the value lives."""
    transport, service, _ = local
    channel = SharedMemoryChannel(str(service.path), TOKEN, 10.0)
    try:
        service.connection(channel.id)._private = None  # as on an accelerator
        session = _session(transport)
        value = np.arange(MIB, dtype=np.float32)
        for round_ in range(2):
            answer = _post(transport, "/v1/states/push", channel.share(_push_frame(
                session, value + round_, f"{round_ + 11:032x}")), channel.headers)
            assert answer.status_code == 200
        assert len(channel._mine) == 2  # the first arena is the first state's memory now
        answer = _post(transport, "/v1/states/pull", channel.share(PullRequest(
            session=session, ids=(f"{11:032x}", f"{12:032x}")).to_frame()), channel.headers)
        values = dict(decode(answer.content, channel.attach).sections["states"].load())
        np.testing.assert_array_equal(values[f"{11:032x}"], value)
        np.testing.assert_array_equal(values[f"{12:032x}"], value + 1)
        del values
    finally:
        _close(channel, service)


def _close(channel, service):
    """Closes ``channel`` and waits for the server's thread to close its side (in this
    process: the other tests count this process's memory files)."""
    channel.close()
    _until(lambda: not service._connections, "the server kept a closed channel")


def test_requests_naming_a_channel_are_checked(local):
    transport, service, db = local
    session = _session(transport)
    value = np.ones(MIB, np.float32)
    channel = SharedMemoryChannel(str(service.path), TOKEN, 10.0)
    try:
        shared = channel.share(_push_frame(session, value))
        # The frame names arenas, but the request names no channel.
        answer = _post(transport, "/v1/states/push", shared, {})
        assert answer.status_code == 400
        assert "names buffers in shared memory" in answer.json()["error"]["message"]
        # A channel that is not open here.
        answer = _post(transport, "/v1/states/push", shared, {"x-statehost-shm": "0" * 32})
        assert answer.status_code == 400
        assert "is not open on this server" in answer.json()["error"]["message"]
        # A channel opened with another token.
        other = db.create_token("team", "submit")
        transport.app.state.runtime.tokens.reload()
        answer = _post(transport, "/v1/states/push", shared, channel.headers, token=other)
        assert answer.status_code == 403
        assert "opened with another token" in answer.json()["error"]["message"]
        # An arena this channel never received.
        forged = json.loads(bytes(shared.pieces[0][8:-4]))
        assert forged["shm"]
        answer = _post(transport, "/v1/states/push", _renamed(shared, "c999"),
                       channel.headers)
        assert answer.status_code == 400
        assert "which this channel never received" in answer.json()["error"]["message"]
    finally:
        _close(channel, service)


def _renamed(encoded, arena):
    """``encoded`` with every shared buffer pointed at ``arena``."""
    from statehost.wire._frame import Encoded

    head = bytes(encoded.pieces[0])
    length = int.from_bytes(head[4:8], "little")
    header = json.loads(head[8 : 8 + length])
    header["shm"] = {k: [arena, n] for k, (_, n) in header["shm"].items()}
    text = json.dumps(header).encode()
    return Encoded([head[:4] + len(text).to_bytes(4, "little") + text + head[8 + length:],
                    *encoded.pieces[1:]])


# -- SIGKILL -----------------------------------------------------------------------------------
_UPLOADER = """
import sys
import numpy as np
import statehost
client = statehost.connect(sys.argv[1], token=sys.argv[2])
assert client._http.shared_memory is not None, client._http.shared_memory_why
state = statehost.ParamState(np.zeros(16 << 20, np.float32))  # 64 MiB
for i in range(1000):
    state.value = np.full(16 << 20, i, np.float32)
    print("pushing", i, flush=True)
    client.push(state)
"""


def test_a_client_killed_in_an_upload_leaves_nothing_in_the_server(served):
    pid = served.process.pid
    _until(lambda: not _mapped(pid), "the server still maps arenas of closed clients")
    before_fds, before_maps, before_shm = _memfds(pid), _mapped(pid), _dev_shm()
    child = subprocess.Popen([sys.executable, "-c", _UPLOADER, served.url, TOKEN],
                             stdout=subprocess.PIPE, text=True, env=served.env)
    try:
        for line in child.stdout:
            if line.startswith("pushing 3"):  # arenas made, mapped, reused: mid-push now
                break
        else:
            pytest.fail(f"the uploader ended early ({child.wait()})")
        assert len(_mapped(pid)) > len(before_maps)  # the server maps the child's arena
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    _until(lambda: _mapped(pid) == before_maps, "the server still maps the dead client's "
           "arenas")
    assert _memfds(pid) == before_fds
    assert _dev_shm() == before_shm
    with statehost.connect(served.url, token=TOKEN) as client:  # and it keeps serving
        assert float(client.jit(lambda: jnp.ones(()) * 3)()) == 3.0


def _pull_until_killed(killed):
    """Pulls a 64 MiB state over and over in a thread, and kills the server meanwhile;
    returns once the client is closed (its locals, the pulled values among them, go)."""
    client = statehost.connect(killed.url, token=TOKEN)
    assert client._http.shared_memory is not None, client._http.shared_memory_why
    state = statehost.ParamState(np.ones(16 << 20, np.float32))  # 64 MiB
    client.push(state)
    pulled, failed = threading.Event(), []

    def pull_until_it_fails():
        while True:
            try:
                client.pull(state)
            except (TransportError, ProtocolError) as exc:  # cut short: either
                failed.append(exc)
                return
            pulled.set()

    puller = threading.Thread(target=pull_until_it_fails)
    puller.start()
    assert pulled.wait(60)
    assert _mapped()  # the pulled value lives in the server's arena
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait()
    puller.join(60)
    assert failed and not puller.is_alive()
    with warnings.catch_warnings():
        # Closing sends DELETE /v1/sessions over httpx to the dead socket: httpcore
        # (1.0.9, _backends/sync.py connect_unix_socket) does not close the socket whose
        # connect() failed, and the ResourceWarning fires when it is collected.
        warnings.simplefilter("ignore", ResourceWarning)
        client.close()
        gc.collect()


def _memfd_files():
    """The memory files (by inode: a descriptor's number is reused) this process holds."""
    return {os.stat(f"/proc/self/fd/{fd}").st_ino for fd in _memfds()}


def test_a_server_killed_in_a_pull_leaves_nothing_in_the_client(tmp_path):
    # Earlier tests' clients in this process may still be collected meanwhile (their files
    # then close): what must hold is that nothing of this test's server stays open.
    gc.collect()
    before_files, before_maps, before_shm = _memfd_files(), _mapped(), _dev_shm()
    with running_server(tmp_path, "--unix", str(tmp_path / "run" / "s.sock"),
                        token=TOKEN) as killed:
        _pull_until_killed(killed)
    # The values pulled last lived in the server's arena, as any value lives in the memory
    # it came in, until they were dropped with the client's locals.
    gc.collect()
    assert _memfd_files() <= before_files
    assert set(_mapped()) <= set(before_maps)
    assert _dev_shm() == before_shm
