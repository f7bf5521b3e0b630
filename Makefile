# The two commands of the README: `make demo` and `make test`. Both create the environment
# first (uv, from uv.lock; a no-op in about a second once it exists).
SHELL := /bin/bash
UV_VERSION := 0.13.9
# Bootstrap with the system Python even when this project's .venv is activated.
export PATH := $(subst $(CURDIR)/.venv/bin:,,$(PATH))
undefine VIRTUAL_ENV
UV := python3 -m uv
RUN = $(UV) run --frozen $(SYNC_FLAGS)

.PHONY: setup browser demo lint test test-fast bench

setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen $(SYNC_FLAGS)

# The tests compile to bytecode only what they import, on first import, instead of all 16,550 files
# of the environment up front (21 s of a fresh clone's `make test`); the demo keeps the full compile
# (pyproject.toml: a no-op `dvc repro` in 1.6 s instead of 3.1 s where PYTHONDONTWRITEBYTECODE is set).
test test-fast: SYNC_FLAGS := --no-compile-bytecode
test test-fast: export PYTHONDONTWRITEBYTECODE :=

demo: setup
	$(RUN) dvc repro

lint: setup
	$(RUN) ruff format --check src tests benchmarks
	$(RUN) ruff check src tests benchmarks

# Headless Chromium for the test that the plots page draws offline (Debian's package; needs root).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no chromium (apt-get install chromium): the offline plots page test is skipped"

test: lint browser
	$(RUN) pytest

# The inner loop: lint and every test that trains nothing for more than seconds.
test-fast: lint
	$(RUN) pytest -m "not slow"

bench: setup
	$(RUN) python benchmarks/run.py
	$(RUN) python benchmarks/reproducibility.py
	$(RUN) python benchmarks/classify.py
	$(RUN) python benchmarks/detect.py
	$(RUN) python benchmarks/translate.py
	$(RUN) python benchmarks/predict.py
	$(RUN) python benchmarks/heads.py
