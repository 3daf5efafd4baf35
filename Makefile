# Everything a fresh machine needs, from Python 3.11 and make alone: each
# target creates .venv and installs the package with its extras on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench clean system-deps
# The database tests start a real PostgreSQL server: Debian's, installed here
# when it is missing (as root, or through sudo).
POSTGRES_INITDB := $(wildcard /usr/lib/postgresql/*/bin/initdb)
# The Redis frontier's tests start a real redis-server: Debian's, likewise.
REDIS_SERVER := $(shell command -v redis-server)
# The browser tests render pages in a real Chromium: Debian's (Playwright's
# own download is not reachable from every machine), installed here too.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)
# Its headless shell, which the add-on launches when it is there: 0.6x the CPU
# a page of the full browser (docs/benchmarks.rst).
HEADLESS_SHELL := $(shell command -v chromium-headless-shell)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,bench,docs,dask,redis,playwright]"
	touch $(STAMP)

## make demo: the example crawl on the bundled local site, without and with scrapy-speedup
demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

## make test: lint, type check, docs build, then the whole test suite (two at a
## time: most tests wait on real crawls and servers, not on the CPU)
test: system-deps lint docs
	$(BIN)/python -m pytest -n 2

system-deps:
ifeq ($(POSTGRES_INITDB),)
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends postgresql
endif
ifeq ($(REDIS_SERVER),)
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends redis-server
endif
ifeq ($(CHROMIUM)$(HEADLESS_SHELL),)
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-headless-shell
else ifeq ($(HEADLESS_SHELL),)
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium-headless-shell
else ifeq ($(CHROMIUM),)
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium
endif

lint: $(STAMP)
	$(BIN)/ruff check scrapy_speedup tests benchmarks example_project
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

## make bench: the benchmarks of docs/benchmarks.rst (several minutes)
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_process.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_thread.py
	$(BIN)/python benchmarks/bench_concurrency.py
	$(BIN)/python benchmarks/bench_doctor.py
	$(BIN)/python benchmarks/bench_crawl_processes.py
	$(BIN)/python benchmarks/bench_browser.py

clean:
	rm -rf $(VENV) docs/_build benchmarks/results *.egg-info
