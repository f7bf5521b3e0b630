# The two commands of the README: `make demo` and `make test`. Both create the environment
# first (uv, from uv.lock; a no-op in about a second once it exists).
SHELL := /bin/bash
UV_VERSION := 0.13.9
# Bootstrap with the system Python even when this project's .venv is activated.
export PATH := $(subst $(CURDIR)/.venv/bin:,,$(PATH))
undefine VIRTUAL_ENV
UV := python3 -m uv

.PHONY: setup demo test bench

setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen

demo: setup
	$(UV) run --frozen dvc repro

test: setup
	$(UV) run --frozen pytest

bench: setup
	$(UV) run --frozen python benchmarks/run.py
	$(UV) run --frozen python benchmarks/classify.py
	$(UV) run --frozen python benchmarks/detect.py
	$(UV) run --frozen python benchmarks/translate.py
	$(UV) run --frozen python benchmarks/predict.py
