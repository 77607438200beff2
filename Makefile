# The two fresh-machine commands of the README: `make run` and `make test`.
# Both work in a project venv (.venv): Debian's own python3 refuses `pip install` outside one
# (PEP 668). They install only when pyproject.toml changed since the last install (a stamp in
# the venv); the package is installed editable, so edits to the code need no reinstall.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install install-test system-deps test-system-deps lint bench

# Debian's bubblewrap gives every kernel its own namespaces (network included); python3-venv
# brings ensurepip, without which `python3 -m venv` cannot make the project venv.
system-deps:
	@missing=""; \
	command -v bwrap >/dev/null 2>&1 || missing="$$missing bubblewrap"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $$missing; \
		else \
			echo "install these with your system's package manager:$$missing" >&2; exit 1; \
		fi; \
	fi

# What only the tests use: tini (the Docker image's init, run by tests/test_docker.py) and
# Debian's own python3 with venv (tests/test_nonroot.py runs the wheel as an unprivileged
# user, who cannot reach an interpreter under a private home such as pyenv's).
test-system-deps:
	@missing=""; \
	command -v tini >/dev/null 2>&1 || missing="$$missing tini"; \
	/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3 python3-venv"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

$(VPY):
	$(PYTHON) -m venv $(VENV)

# One stamp per install flavour; each is redone when pyproject.toml (the dependencies) changes.
$(VENV)/.installed-run: pyproject.toml | $(VPY)
	$(VPY) -m pip install -e . && touch $@

$(VENV)/.installed-test: pyproject.toml | $(VPY)
	$(VPY) -m pip install -e '.[test]' && touch $@

install: system-deps $(VENV)/.installed-run

install-test: system-deps test-system-deps $(VENV)/.installed-test

run: install
	$(VENV)/bin/pixell-kernel-runtime serve --examples

# ruff first (seconds), then the whole suite; either failing fails the target.
test: install-test
	$(VPY) -m ruff check .
	$(VPY) -m pytest

lint: install-test
	$(VPY) -m ruff check . && $(VPY) -m ruff format --check .

bench: install-test
	$(VPY) bench/bench_packages.py && $(VPY) bench/bench_invoke.py && $(VPY) bench/bench_sandbox.py \
		&& $(VPY) bench/bench_streaming.py && $(VPY) bench/bench_compare.py
