# Two commands do all the set-up on a fresh machine:
#   make demo   - run the example task end to end on the local backend
#   make test   - lint, type-check and run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: demo test lint bench install system-packages

install: system-packages $(STAMP)

# Containers (`runner submit --image`) need podman with runc and catatonit; the tests build
# their images with mmdebstrap. Installed from Debian's archive when missing and we are root on
# Debian; elsewhere install them yourself (worker/executors/container/runtime.py says what it found).
CONTAINER_PACKAGES := podman runc catatonit mmdebstrap
system-packages:
	@missing=""; for p in $(CONTAINER_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then \
		echo "installing$$missing (apt)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# An editable install leaves the project uncompiled; where PYTHONDONTWRITEBYTECODE is set
	# every runner, worker and task process would compile it again (tens of ms each).
	$(PY) -m compileall -q runner worker >/dev/null
	# checkov pins packaging<24, which pytest cannot live with: it gets a venv of its own.
	python3 -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q --disable-pip-version-check checkov==3.3.30
	touch $@

demo: $(STAMP)
	$(PY) examples/make_data.py examples/data
	$(VENV)/bin/runner submit task/ --inputs 'examples/data/*.csv' --workers 4

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	set -o pipefail; $(VENV)/bin/lint-imports --no-cache | sed -n '/^Contracts: /,$$p'
	$(VENV)/bin/lychee --offline --include-fragments --no-progress README.md docs/*.md bench/README.md

# Most tests wait on processes and emulators, not the CPU: three at a time (tests/conftest.py).
TEST_PROCESSES ?= 3
test: lint
	$(VENV)/bin/pytest -q -n $(TEST_PROCESSES)

bench: $(STAMP)
	# the peers: GNU parallel from Debian when we may install it, huey from PyPI
	command -v parallel >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get install -y -q parallel >/dev/null; } || true
	$(PY) -m pip install -q --disable-pip-version-check 'huey>=2.5'
	$(PY) bench/local_overhead.py
