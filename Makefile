.PHONY: check lint test bench

# Lint, types and tests: what CI holds the line on.
check: lint test

lint:
	ruff check .
	ruff format --check .
	mypy

test:
	python -m pytest

bench:
	python bench/baseline.py
