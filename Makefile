# Build commands. Every target works on a fresh clone: the venv is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_PATHS := async_session_cache tests benchmarks

PYTEST_ARGS ?=
BENCH_ARGS ?=
REQUIRE_SERVICES ?=
PYTEST := $(BIN)/pytest $(if $(filter 1,$(REQUIRE_SERVICES)),--require-services) $(PYTEST_ARGS)

.PHONY: venv services test check demo bench clean

venv: $(STAMP)

# Re-installs whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Installs redis-server and PostgreSQL when missing (as root); never fails, the tests say what is absent.
services:
	bash scripts/ensure-services.sh

test: venv services
	$(PYTEST)

check: venv services
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
	$(PYTEST)

demo: venv
	$(BIN)/python -m examples.demo

# The FastAPI catalogue example (env: see examples/catalogue/__init__.py).
.PHONY: serve
serve: venv
	$(BIN)/python -m uvicorn examples.catalogue.app:app --host 127.0.0.1 --port 8000

# Every benchmark always runs; the status is the first failure's (1: target missed, 2: check).
# bench_compare also writes benchmarks/results/bench_compare.png.
BENCHMARKS := bench_local bench_shared bench_compare bench_fastapi
bench: venv
	@status=0; for b in $(BENCHMARKS); do \
		echo "== $$b"; $(BIN)/python benchmarks/$$b.py $(BENCH_ARGS) || [ $$status -ne 0 ] || status=$$?; \
	done; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
