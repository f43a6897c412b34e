"""The transforms under multi-controller JAX: 2 processes x 4 CPU devices, gloo collectives.

Each process of a ``jax.distributed`` group runs the same scenarios on its host-local lanes
(``tests/core/multiprocess_scenarios.py``); gathered over the group, the results equal those
of this single process on 8 devices.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.core import multiprocess_scenarios as scenarios
from tests.serving import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """The scenarios' results from each process of a 2-process group, by process index."""
    tmp = tmp_path_factory.mktemp("group")
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.core.multiprocess_scenarios", address, "2", str(i),
         str(tmp / f"p{i}.npz")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the 2-process group did not finish in 240 s:\n" + "\n".join(logs))
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    return [dict(np.load(tmp / f"p{i}.npz")) for i in range(2)]


@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_a_two_process_group_computes_what_one_process_does(group_results, name):
    alone = scenarios.SCENARIOS[name](slice(0, scenarios.LANES))
    for index, results in enumerate(group_results):
        for key, expected in alone.items():
            np.testing.assert_allclose(results[f"{name}.{key}"], expected, rtol=1e-6,
                                       err_msg=f"{name}.{key} in process {index}")
