# elbolab: `make run` and `make test` each set up everything on a fresh machine.
#
# A virtual environment in .venv; torch==2.13.0 first (a CPU build lies on this
# machine's disk; a bare `torch` requirement would pull a multi-GB CUDA build),
# then the project in editable mode with its test extra.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.elbolab-installed
OUT    ?= runs/report
PYTEST_ARGS ?=

.PHONY: run test test-slow test-all setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## The main job on the built-in data (scikit-learn's 8x8 digits).
run: $(STAMP)
	$(VENV)/bin/elbolab report --dataset digits --out $(OUT) --overwrite

## The default test suite (under 10 minutes on 2 cores; `slow` runs left out): two
## single-threaded pytest processes (pytest-xdist), each test file in one of them.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

## The long convergence runs.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
