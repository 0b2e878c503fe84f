# `make run` and `make test` work on a fresh machine with only Python 3.11+: everything else lands in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What running Parley needs (make run, client, cluster); then what the tests add (pytest, Playwright, validators).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run client test install clean cluster bench

run: $(STAMP)
	$(BIN)/python server.py $(ARGS)

# One store, three instances and nginx on 127.0.0.1:8080 (nginx/README.md); Ctrl-C stops all.
cluster: $(STAMP)
	$(BIN)/python nginx/cluster.py $(ARGS)

# The terminal client: make client ARGS="--token …" (or set PARLEY_TOKEN, or pass the URL make run prints).
client: $(STAMP)
	$(BIN)/python client.py $(ARGS)

# One process by default (the cluster tests are the most reliable on a busy machine so); PYTEST_WORKERS=2 runs two,
# each taking whole test modules (a module's cluster fixture stays in one): ~40 % faster, and more load on the box.
PYTEST_WORKERS ?= 0
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

install: $(STAMP)

# Parley beside a bare Tornado server (and python-socketio) in one run; `make bench BENCH_ARGS=--quick` in seconds.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Parley needs Python 3.11 or newer" if sys.version_info < (3, 11) else 0)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
