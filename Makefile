# The two commands of the README: `make demo` and `make test`.
# Both install what they need (Debian packages when run as root, a venv) first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/pgveil: pyproject.toml
	./scripts/bootstrap

install: $(BIN)/pgveil

demo: install
	$(BIN)/pgveil demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pgveil-demo build *.egg-info
