# The two entry points of a fresh machine: `make demo` and `make test`. Both create or refresh .venv.
.PHONY: venv demo test lint typecheck unit swarm chaos bench clean

venv:
	@./scripts/setup_venv.sh

demo: venv
	.venv/bin/potluck demo

lint: venv
	.venv/bin/ruff check src tests
	.venv/bin/ruff format --check src tests

typecheck: venv
	.venv/bin/mypy

test: venv lint typecheck
	.venv/bin/python -m pytest -q -x --durations=15 tests

bench: venv
	.venv/bin/potluck bench inference --json

clean:
	rm -rf .venv build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
