# The two first commands of the README:
#   make run   set up, then start the serving cluster on the embedded default (a local
#              Ray, CPU, SmolLM2), answer one chat request through its OpenAI API, stop
#   make test  set up, then lint, type-check and run the test suite
# make serve keeps the cluster serving (Ctrl-C stops it).
VENV := .venv/bin
PROMPT ?= Explain what a KV cache is in one sentence.

.PHONY: setup run serve test lint typecheck bench-cpu
setup:
	./scripts/setup.sh

run: setup
	$(VENV)/kvserve serve --device cpu --chat "$(PROMPT)" --exit

serve: setup
	$(VENV)/kvserve serve

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

typecheck: setup
	$(VENV)/mypy

test: lint typecheck
	$(VENV)/pytest -q -m "not gpu" tests

bench-cpu: setup
	$(VENV)/python -m bench.cpu
