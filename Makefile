# relay: make run (local stack on simulated models, no keys) and make test.
# Both create .venv and install the hash-pinned lock by themselves.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test unit lock env-table clean

$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	touch $(STAMP)

## run: the proxy with the relay on simulated Ollama/OpenAI/Anthropic providers (Ctrl-C stops it)
run: $(STAMP)
	$(PY) -m sim.stack run

## test: the whole suite, against real proxy processes on loopback
test: $(STAMP)
	$(PY) -m pytest

## unit: the fast in-process tests only
unit: $(STAMP)
	$(PY) -m pytest -m "not proxy"

## lock: re-resolve requirements.in into requirements.lock (exact versions, hashes)
lock:
	$(PY) -m pip install --quiet pip-tools
	$(PY) -m piptools compile --generate-hashes --allow-unsafe --quiet --no-emit-find-links --no-emit-index-url -o requirements.lock requirements.in

## env-table: the Markdown table of every RELAY_* variable (as in README.md)
env-table:
	@$(PYTHON) relay_plugin.py --env-table

clean:
	rm -rf $(VENV) .run .pytest_cache
