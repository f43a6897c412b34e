# statehost developer entry points. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: serve test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[client,server,test]"
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m statehost.server serve $(SERVE_ARGS)

# Two pytest workers (pytest-xdist), each with whole test files (--dist loadfile), so a
# module's server is started once: most of a test's time is spent waiting on a server
# subprocess or a compile, which the other worker fills. Files go out in collection order
# (--no-loadscope-reorder: xdist would order them by test count), which tests/conftest.py
# makes longest first. `make test PYTEST_ARGS=-n0` runs the suite in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The bench extra (brainstate) must not move the venv's jax/jaxlib, which the test suite
# runs on: pin them to what is installed. If brainstate cannot be installed under that pin,
# the bench still runs and its brainstate row says why.
bench: $(STAMP)
	$(PY) -m pip freeze --all | grep -iE '^(jax|jaxlib)==' > $(VENV)/bench-constraints.txt
	$(PY) -m pip install --quiet -c $(VENV)/bench-constraints.txt -e ".[bench]" || \
		echo "make bench: the bench extra did not install with the venv's jax pinned; see above"
	$(PY) bench/bench_core.py
	$(PY) bench/bench_remote.py
	$(PY) bench/bench_named.py
	$(PY) bench/bench_cli.py
	$(PY) bench/bench_outputs.py
	$(PY) bench/bench_async.py
	$(PY) bench/bench_sharedbox.py
	$(PY) bench/bench_cluster.py

lint: $(STAMP)
	$(PY) -m ruff check statehost client server tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
