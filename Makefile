# Two commands do the whole set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   - create .venv, install, run the main job on the embedded local Ray runtime
#   make test   - create .venv, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test bench install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,las,progress,serve,plots,webtest,geo]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/distspatial demo

# the suite runs its modules on TEST_WORKERS processes (pytest-xdist; each module whole on one, with its own Ray
# runtime): most tests wait on Ray, so two workers on two cores cut the wall time
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_core.py
