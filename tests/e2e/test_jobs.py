"""Jobs against a real ``statehost serve``: Ctrl-C in a real client process, a job that
outlives its client's ``kill -9``, progress streamed as Server-Sent Events."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import JobCancelledError, JobNotDoneError
from tests.serving import free_port, running_server

# The loop's step sleeps this long on the server (a host callback), so a loop of N steps
# takes N x STEP seconds at least.
STEP = 0.02

_PRELUDE = """
import sys, time
import jax, jax.numpy as jnp
import statehost

url, token, name, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = statehost.connect(url, token=token)
counter = statehost.ParamState(jnp.zeros((), jnp.int32))
if name != "-":
    client.put(name, counter)

def step():
    jax.debug.callback(lambda: time.sleep(STEP))
    counter.value = counter.value + 1
    return counter.value
""".replace("STEP", repr(STEP))

_CTRL_C = _PRELUDE + """
try:
    client.loop(client.jit(step), steps)  # a bar, were stderr a terminal
except KeyboardInterrupt:
    print("INTERRUPTED", time.monotonic(), flush=True)
    client.close()
    sys.exit(0)
print("NOT INTERRUPTED", flush=True)
"""

_SUBMIT_AND_HANG = _PRELUDE + """
job = client.loop(client.jit(step), steps, wait=False)
print("JOB", job.id, flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # A short session TTL: a job whose client died keeps its session open by itself.
    with running_server(tmp_path_factory.mktemp("jobs"), "--session-ttl", "2") as served:
        yield served


def _counting_step(counter):
    """A step adding one to ``counter`` that sleeps STEP on the server (a host callback)."""

    def step():
        import jax

        jax.debug.callback(lambda: time.sleep(STEP))
        counter.value = counter.value + 1
        return counter.value

    return step


@pytest.fixture
def counting(served):
    """``(client, counter, remote step)``: a client of ``served``, closed at the end."""
    counter = statehost.ParamState(jnp.zeros((), jnp.int32))
    with statehost.connect(served.url, token=served.token) as client:
        yield client, counter, client.jit(_counting_step(counter))


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _start(served, script, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
    return subprocess.Popen([sys.executable, str(script), served.url, served.token, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).parents[2])


def _api(served, method, path):
    response = httpx.request(method, served.url + path, timeout=10,
                             headers={"authorization": f"Bearer {served.token}"})
    return response.json()


def _newest_job(served, known, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in _api(served, "GET", "/v1/jobs")["jobs"] if j["id"] not in known]
        if jobs:
            return jobs[-1]
        time.sleep(0.05)
    raise AssertionError("no job was submitted")


def _wait_for(served, job_id, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _api(served, "GET", f"/v1/jobs/{job_id}")
        if predicate(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never got there: {job}")


def _known(served):
    return {j["id"] for j in _api(served, "GET", "/v1/jobs")["jobs"]}


def _resident(served):
    """How many states the server holds."""
    return served.metric("statehost_resident_states")


def test_ctrl_c_cancels_the_loop_and_raises_within_a_second(served, tmp_path):
    known = _known(served)
    client_process = _start(served, _script(tmp_path, "ctrl_c.py", _CTRL_C), "e2e/ctrl_c",
                            "100000")
    try:
        job = _newest_job(served, known)
        _wait_for(served, job["id"], lambda j: j["progress"]["done"] >= 5)

        sent = time.monotonic()
        client_process.send_signal(signal.SIGINT)
        out, err = client_process.communicate(timeout=60)
    finally:
        client_process.kill()
    line = next((x for x in out.splitlines() if x.startswith("INTERRUPTED")), None)
    assert line is not None, out + err
    assert float(line.split()[1]) - sent < 1.0, (line, sent)
    assert client_process.returncode == 0, err

    ended = _wait_for(served, job["id"], lambda j: j["status"] != "running", timeout=10)
    done = ended["progress"]["done"]
    assert ended["status"] == "cancelled" and 5 <= done < 100000, ended
    assert ended["reason"] == "cancelled"
    # The server still serves, and the state is the one of the last completed step.
    with statehost.connect(served.url, token=served.token) as client:
        counter = client.get("e2e/ctrl_c")
        assert int(counter.value) == done
        assert int(client.jit(lambda: counter.value + 1)()) == done + 1


def test_a_job_outlives_its_clients_kill_9_and_another_process_reattaches(served, tmp_path):
    steps = 150  # >= 3 s of steps: past the 2 s session TTL
    known, resident = _known(served), _resident(served)
    submitter = _start(served, _script(tmp_path, "submit.py", _SUBMIT_AND_HANG), "-",
                       str(steps))
    try:
        line = submitter.stdout.readline()
        assert line.startswith("JOB "), line + submitter.stderr.read()
        job_id = line.split()[1]
        _wait_for(served, job_id, lambda j: j["progress"]["done"] >= 2)
        submitter.send_signal(signal.SIGKILL)
        submitter.wait(timeout=30)
    finally:
        submitter.kill()
        submitter.communicate()  # closes the pipes
    assert job_id not in known

    with statehost.connect(served.url, token=served.token) as client:
        job = client.job(job_id)
        assert job.status == "running"
        out = job.result()
        assert job.status == "completed" and job.progress == (steps, steps)
        assert int(out) == steps  # every step ran: the dead client's session was kept open
    # Its TTL counts from the job's end: then the dead client's states are freed.
    deadline = time.monotonic() + 60
    while _resident(served) != resident and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _resident(served) == resident


def test_a_job_outlives_client_close_and_its_states_go_when_it_ends(served, counting):
    resident = _resident(served)
    client, _, step = counting
    job = client.loop(step, 60, wait=False)
    while job.progress[0] < 2:
        time.sleep(0.02)
    client.close()  # the session is closed; the job keeps its states

    assert _resident(served) > resident
    assert "while 1 job(s) of it run; its states are freed when they end" in served.output()
    with statehost.connect(served.url, token=served.token) as other:
        again = other.job(job.id)
        assert int(again.result()) == 60
        assert again.status == "completed" and again.progress == (60, 60)
        assert _resident(served) == resident  # freed as the job ended, before it was seen


def test_progress_events_arrive_before_the_end(served, counting):
    client, _, step = counting
    job = client.loop(step, 60, wait=False)
    events = []
    with httpx.stream("GET", f"{served.url}/v1/jobs/{job.id}/events", timeout=30,
                      headers={"authorization": f"Bearer {served.token}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((time.monotonic(), name, json.loads(line[6:])))
    assert int(job.result()) == 60

    names = [name for _, name, _ in events]
    assert names[-1] == "end" and names.count("end") == 1 and events[-1][2]["status"] == \
        "completed"
    progress = [(t, data) for t, name, data in events if name == "progress"]
    done = [data["done"] for _, data in progress]
    assert len(set(done)) >= 3 and done == sorted(done), done
    assert events[-1][0] - progress[0][0] > 0.3  # the first ones came well before the end
    duration = progress[-1][0] - progress[0][0]
    assert len(progress) <= 12 * duration + 3  # at most ~10 a second
    assert any(data["steps_per_second"] for _, data in progress)


def test_result_with_a_timeout_raises_and_the_job_runs_on(counting):
    client, counter, step = counting
    job = client.loop(step, 100000, wait=False)
    started = time.monotonic()
    with pytest.raises(JobNotDoneError, match="the timeout passed. It runs on") as info:
        job.result(timeout=0.5)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 5
    assert job.status == "running"
    job.cancel()
    with pytest.raises(JobCancelledError) as info:
        job.result()
    assert int(counter.value) == info.value.completed > 0


def test_statehost_jobs_lists_the_tokens_jobs(served, tmp_path):
    with statehost.connect(served.url, token=served.token) as client:
        w = statehost.ParamState(jnp.zeros(3, jnp.float32))

        def add(x):
            w.value = w.value + x
            return w.value

        out = client.loop(client.jit(add), 4, over=np.ones((4, 3), np.float32), progress=False)
        np.testing.assert_array_equal(out, [4.0, 4.0, 4.0])
        job_id = client._http.json("GET", "/v1/jobs")["jobs"][-1]["id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu"})
    result = subprocess.run([str(Path(sys.executable).with_name("statehost")), "jobs", "--url",
                             served.url, "--token", served.token],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "STATUS", "STEPS", "STEPS/S"]
    row = next(r for r in rows if r.startswith(job_id))
    assert row.split()[1:3] == ["completed", "4/4"]


def test_statehost_jobs_loads_neither_the_server_nor_jax(tmp_path):
    from tests.e2e.test_cli_ops import _closed_url, _layers, _loaded_by

    loaded = _loaded_by(tmp_path, "jobs", "--url", _closed_url(), "--timeout", "2")
    assert _layers(loaded) == {"statehost.client", "httpx"} and "jax" not in loaded


def test_statehost_jobs_without_a_server_fails_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    result = subprocess.run([str(Path(sys.executable).with_name("statehost")), "jobs", "--url",
                             f"http://127.0.0.1:{free_port()}", "--timeout", "2"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("statehost jobs: GET /v1/jobs: cannot connect to")
    assert len(result.stderr.strip().splitlines()) == 1


def test_sigterm_stops_a_running_loop_between_steps_and_flushes_it(tmp_path):
    with running_server(tmp_path, env={"STATEHOST_DURABILITY": "interval",
                                       "STATEHOST_FLUSH_INTERVAL": "3600"}) as served:
        with statehost.connect(served.url, token=served.token) as client:
            counter = statehost.ParamState(jnp.zeros((), jnp.int32))
            client.put("e2e/shutdown", counter)
            job = client.loop(client.jit(_counting_step(counter)), 100000, wait=False)
            while job.progress[0] < 5:
                time.sleep(0.02)
            started = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            assert served.process.wait(timeout=30) == 0, served.output()[-3000:]
            assert time.monotonic() - started < 15
    with running_server(tmp_path) as again:  # the same data dir: the flushed state is back
        with statehost.connect(again.url, token=again.token) as client:
            done = int(client.get("e2e/shutdown").value)
            assert 5 <= done < 100000
