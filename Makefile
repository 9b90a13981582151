# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT    := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: demo test test-unit test-integration test-e2e bench soak redteam proto proto-check lint redis wrk browser promtool clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	@touch $@

# redis-server for the integration tests; CI runs as root, so apt-get works there.
redis:
	@command -v redis-server >/dev/null 2>&1 || { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq redis-server; }

# Debian's Chromium for the browser tests (tests/e2e/browser.py drives it through playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq chromium; }

# promtool checks and unit-tests the PrometheusRule alerts and the dashboard's queries.
promtool:
	@command -v promtool >/dev/null 2>&1 || { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq --no-install-recommends prometheus; }

wrk:
	@command -v wrk >/dev/null 2>&1 || { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq wrk; }

demo: $(STAMP)
	$(BIN)/python -m extauthz demo $(if $(KEEP),--keep) $(if $(SEED),--seed $(SEED)) $(if $(BUDGET),--budget $(BUDGET))

# The suite, then the lint that keeps the package strictly typed (ruff + mypy strict).
test: $(STAMP) redis browser promtool
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory lint

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(STAMP) redis promtool
	$(BIN)/python -m pytest -q tests/integration

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

bench: $(STAMP) wrk redis
	$(BIN)/python -m tests.bench.run_bench $(BENCH_ARGS)
	$(BIN)/python -m tests.bench.bench_check_inprocess
	$(BIN)/python -m tests.bench.bench_protect --json bench-protect.json
	$(BIN)/python -m tests.bench.bench_pow --json bench-pow.json
	$(BIN)/python -m tests.bench.bench_detect_a
	$(BIN)/python -m tests.bench.bench_detect_b
	$(BIN)/python -m tests.bench.power_curve

# Ten minutes at 200 req/s from 5,000 distinct clients through Envoy + guard + demo model:
# guard RSS at start and end, status codes, latency, errors logged (soak.json). SOAK_ARGS adds
# flags, e.g. SOAK_ARGS='--duration 60 --store redis'.
soak: $(STAMP) redis
	$(BIN)/python -m tests.bench.soak --json soak.json $(SOAK_ARGS)

# Issue 8's acceptance: every attack at 2,000 instances with and without the guard (about 5 min).
redteam: $(STAMP)
	$(BIN)/python -m tests.bench.redteam_acceptance $(if $(SEED),--seed $(SEED))

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

lint: $(STAMP)
	$(BIN)/ruff check extauthz tests scripts
	$(BIN)/ruff format --check extauthz tests scripts
	$(BIN)/mypy extauthz

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
