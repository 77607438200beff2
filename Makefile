# The two fresh-machine commands of the README: `make run` and `make test`.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test system-deps lint bench

# Debian's bubblewrap gives every kernel its own namespaces (network included).
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && ! command -v bwrap >/dev/null 2>&1; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends bubblewrap; \
	fi

run: system-deps
	$(PYTHON) -m pip install -e . && $(PYTHON) -m pixell_kernel_runtime serve --examples

test: system-deps
	$(PYTHON) -m pip install -e '.[test]' && $(PYTHON) -m ruff check . && $(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench:
	$(PYTHON) bench/bench_packages.py && $(PYTHON) bench/bench_invoke.py && $(PYTHON) bench/bench_sandbox.py
