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

test: venv cpp-deps browser
	$(BIN)/python -m pytest -q --durations=25 tests benchmarks --bench-quick

# What export/cpp builds with (Debian packages); tests/edge/test_cpp.py builds it. Installs only
# the missing ones; elsewhere than Debian it names them and leaves the install to you.
CPP_DEPS := cmake g++ ninja-build pkg-config nlohmann-json3-dev libjpeg62-turbo-dev libpng-dev \
	libssl-dev libexif-dev libcli11-dev libgtest-dev
.PHONY: cpp-deps
cpp-deps:
	@missing=$$(for p in $(CPP_DEPS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "cpp-deps: all installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "cpp-deps: no apt-get here; install the equivalents of:" $$missing; \
	else \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		echo "cpp-deps: installing" $$missing; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# A headless Chromium from Debian's packages, for tests/runtime/test_review.py (the review page
# checked in a real browser: no broken image, the filter works, a screenshot). Same pattern as
# cpp-deps: installs only what is missing; elsewhere than Debian it says so. A prerequisite of
# `test` (about 200 MB once), so CI checks the page in a real browser; where no Chromium can be
# installed the browser tests skip, naming this target.
BROWSER_DEPS := chromium-headless-shell fonts-dejavu-core
.PHONY: browser
browser:
	@missing=$$(for p in $(BROWSER_DEPS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "browser: all installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: no apt-get here; install a Chromium (chromium-headless-shell or chromium)" \
			"and put it on PATH, or set COPS_CHROMIUM=/path/to/chromium"; \
	else \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		echo "browser: installing" $$missing; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench: venv
	$(BIN)/python -m pytest -q benchmarks

# ruff, then the import contracts in .importlinter (imports point down; torch-free run side).
lint: venv
	$(BIN)/ruff check cops_deploy tests benchmarks export
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
