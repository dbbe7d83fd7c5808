# The two first commands of the README:
#   make run   set up, then generate with the default model (SmolLM2, CPU)
#   make test  set up, then lint, type-check and run the test suite
VENV := .venv/bin
PROMPT ?= Explain what a KV cache is in one sentence.

.PHONY: setup run test lint typecheck bench-cpu
setup:
	./scripts/setup.sh

run: setup
	$(VENV)/kvserve chat "$(PROMPT)" --max-tokens 64

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

typecheck: setup
	$(VENV)/mypy

test: lint typecheck
	$(VENV)/pytest -q -m "not gpu" tests

bench-cpu: setup
	$(VENV)/python -m bench.cpu
