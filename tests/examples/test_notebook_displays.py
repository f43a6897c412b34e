"""What a notebook shows of the client's objects, rendered by a real kernel (nbclient),
and a large transfer's progress bar there.

Each object's display (``_repr_html_``, and IPython's text) comes from what the client
already holds: displaying sends no request, which the cells check on the server's byte
counters around the displaying cell.
"""

import textwrap
from pathlib import Path

import nbformat

from tests.examples.notebooks import run_notebook
from tests.serving import running_server

REPO_ROOT = Path(__file__).resolve().parents[2]

SETUP = """\
import os, time
import jax, jax.numpy as jnp, numpy as np, httpx
import statehost
from statehost.util.filter import OfType

URL, TOKEN = os.environ["STATEHOST_URL"], os.environ["STATEHOST_TOKEN"]
client = statehost.connect(URL, token=TOKEN)

def sent_bytes():
    text = httpx.get(URL + "/metrics", headers={"authorization": "Bearer " + TOKEN}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("statehost_wire_bytes_total{") and 'direction="out"' in line)

class Affine(statehost.nn.Module):
    def __init__(self, lanes):
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((lanes, 4)))
    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value

model = Affine(8)
client.put("team/net", model)
step = client.pmap(model, axis_name="i", in_axes=0, out_axes=0,
                   state_in_axes={0: OfType(statehost.ParamState)},
                   state_out_axes={0: OfType(statehost.ParamState)})
"""

CELLS = [
    SETUP,
    "client",
    "net = client.get('team/net')\nnet",
    "model.weight.value = model.weight.value + 1\nmodel",
    "step",
    "delta = np.ones((8, 4), np.float32)\nstep(delta); x = step(delta); client.sync()\n"
    "before = sent_bytes()",
    "x",
    "assert sent_bytes() == before, (sent_bytes(), before)\nfloat(np.asarray(x)[0, 0])",
    "step",
    "counter = statehost.ParamState(jnp.zeros((), jnp.int32))\n"
    "def tick():\n"
    "    jax.debug.callback(lambda: time.sleep(0.01))\n"
    "    counter.value = counter.value + 1\n"
    "    return counter.value\n"
    "job = client.loop(client.jit(tick), 30, wait=False, progress=False)\n"
    "job.result(); job.refresh(); job",
    "client.put('team/big', statehost.ParamState(jnp.ones((72 * 2**18,))))  # 72 MiB",
    "client.close()",
]


def _html(cell):
    for output in cell.outputs:
        if output["output_type"] == "execute_result":
            return output["data"].get("text/html", ""), output["data"]["text/plain"]
    raise AssertionError(f"the cell shows nothing: {cell.source!r} -> {cell.outputs!r}")


def test_the_client_objects_display_in_a_notebook(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    with running_server(tmp_path) as served:
        done = run_notebook(notebook, REPO_ROOT, {
            "JAX_PLATFORMS": "cpu", "STATEHOST_URL": served.url,
            "STATEHOST_TOKEN": served.token})
    cells = done.cells

    html, text = _html(cells[1])  # the client
    assert "statehost.Client" in html and "8 device(s), as of connect" in html
    assert f"{served.url}/dashboard" in html and "0.10.2 / 0.10.2" in html
    assert text.startswith(f"statehost.Client('{served.url}', session ")

    html, _ = _html(cells[2])  # a module from client.get
    assert "Affine: 1 state(s)" in html
    assert "<td style=\"text-align:left\">weight</td>" in html and "(8, 4)" in html
    assert "float32" in html and "128 B" in html and "in sync" in html

    html, _ = _html(cells[3])  # a module changed locally since
    assert "changed locally" in html

    html, _ = _html(cells[4])  # the transform
    assert "StatefulMapping" in html and served.url in html
    assert "asynchronous after the first call of a signature" in html
    assert "not yet (sent at the next call)" in html

    html, text = _html(cells[6])  # an asynchronous output, not fetched
    assert "statehost RemoteArray" in html and "ready" in html and "value" not in html
    assert text == "RemoteArray(float32[8, 4], ready)"
    assert _html(cells[7])[1] == "4.0"  # displaying it sent nothing; reading it fetches

    html, _ = _html(cells[8])  # the transform, once called
    assert "cached on the server</td><td style=\"text-align:left\">yes" in html

    html, text = _html(cells[9])  # a job
    assert "statehost Job" in html and '<progress value="30" max="30">' in html
    assert "completed" in html and "30 / 30" in html

    shown = "".join(o.get("text", "") for o in cells[10].outputs if o["output_type"] == "stream")
    assert "put upload" in shown  # a transfer's bar (text: this kernel has no ipywidgets)
