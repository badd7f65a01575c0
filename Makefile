# cops-deploy: set-up and everyday commands. Each target creates or reuses .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run 'make PY=/path/to/python3.11 ...'"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/cops demo --out demo_out

test: venv
	$(BIN)/python -m pytest -q tests benchmarks --bench-quick

bench: venv
	$(BIN)/python -m pytest -q benchmarks

# ruff, then the import contracts in .importlinter (imports point down; torch-free run side).
lint: venv
	$(BIN)/ruff check cops_deploy tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
