# Two commands do all the set-up on a fresh machine:
#   make demo   - run the example task end to end on the local backend (installs the runner only)
#   make test   - install everything, lint, type-check and run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: demo test lint bench install system-packages

install: system-packages $(STAMP)

# Containers (`runner submit --image`) need podman with runc and catatonit; the tests build
# their images with mmdebstrap and run them on docker too (the tests start its daemon). Installed
# from Debian's archive when missing and we are root on Debian; elsewhere install them yourself
# (worker/executors/container/runtime.py says what it found). COMMAND:PACKAGE where they differ.
CONTAINER_PACKAGES := podman runc catatonit mmdebstrap dockerd:docker.io
system-packages:
	@missing=""; for p in $(CONTAINER_PACKAGES); do command -v $${p%%:*} >/dev/null || missing="$$missing $${p#*:}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then \
		echo "installing$$missing (apt)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi

# uv installs what pip does in a twentieth of the time (seconds, not minutes, on a fresh machine);
# pip only fetches uv itself into the venv. Bytecode: uv, unlike pip, leaves what it installs
# uncompiled. Compiling the whole dev venv up front (--compile-bytecode) took 30 s of a fresh
# `make test` (47 s of CPU), mostly for modules nothing loads; instead `make test` and `make bench`
# let their processes write the bytecode of what they import, once, even where the environment
# sets PYTHONDONTWRITEBYTECODE (where every process would compile its imports again:
# google.cloud.compute_v1 6 s of CPU instead of 2). The demo's small venv is compiled up front.
WRITE_BYTECODE := env -u PYTHONDONTWRITEBYTECODE
UV := $(PY) -m uv
$(VENV)/bin/uv:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv

$(STAMP): pyproject.toml | $(VENV)/bin/uv
	$(UV) pip install -q --python $(PY) -e '.[dev]'
	# An editable install leaves the project uncompiled too (the tests' helpers run as
	# processes of their own: fake servers, VMs).
	$(PY) -m compileall -q cflow runner worker infra tests >/dev/null
	# checkov pins packaging<24, which pytest cannot live with: it gets a venv of its own.
	$(UV) venv -q --allow-existing .venv-checkov
	$(UV) pip install -q --python .venv-checkov/bin/python checkov==3.3.30
	touch $@

# The demo installs what a local run needs and nothing else (no dev tools, no cloud clients, no
# system packages), and says how long the set-up and the run each took.
$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/uv
	$(UV) pip install -q --compile-bytecode --python $(PY) -e '.[runner]'
	$(PY) -m compileall -q cflow runner worker >/dev/null
	touch $@

demo:
	@start=$$(date +%s%N); \
	$(MAKE) --no-print-directory $(DEMO_STAMP) || exit; \
	ready=$$(date +%s%N); \
	echo "demo: set-up took $$(( (ready - start) / 1000000 )) ms" >&2; \
	$(PY) examples/make_data.py examples/data && \
	$(VENV)/bin/runner submit task/ --inputs 'examples/data/*.csv' --workers 4; code=$$?; \
	echo "demo: the run took $$(( ($$(date +%s%N) - ready) / 1000000 )) ms" >&2; \
	exit $$code

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	set -o pipefail; $(VENV)/bin/lint-imports --no-cache | sed -n '/^Contracts: /,$$p'
	$(VENV)/bin/lychee --offline --include-fragments --no-progress README.md docs/*.md bench/README.md

# Most tests wait on processes and emulators, not the CPU: four at a time (tests/conftest.py).
# Each run lists its slowest tests, the first place to look when the suite grows slower.
TEST_PROCESSES ?= 4
test: lint
	$(WRITE_BYTECODE) $(VENV)/bin/pytest -q -n $(TEST_PROCESSES) --durations=25

bench: $(STAMP)
	# the peers: GNU parallel from Debian when we may install it (huey comes with the dev extra)
	command -v parallel >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get install -y -q parallel >/dev/null; } || true
	# bench/python_api.py's peers, too big for the dev extra (its quick form skips them there)
	$(UV) pip install -q --compile-bytecode --python $(PY) 'dask[distributed]>=2024.1' 'ray>=2.9'
	# every benchmark's full form (bench/_*.py is shared code); status 77: it cannot run here
	@for b in bench/[!_]*.py; do echo "== $(PY) $$b" >&2; $(WRITE_BYTECODE) $(PY) $$b; rc=$$?; \
		if [ $$rc = 77 ]; then echo "== $$b skipped" >&2; elif [ $$rc != 0 ]; then exit $$rc; fi; \
	done
