# The two commands of the README: `make demo` and `make test`.
# Both install what they need (Debian packages when run as root, a venv) first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench fuzz clean

$(BIN)/pgveil: pyproject.toml setup.py native/pgveil_accel.c native/pgveil_gcm.c native/pgveil_gcm.h
	./scripts/bootstrap
	touch $@

install: $(BIN)/pgveil

demo: install
	$(BIN)/pgveil demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest
	./scripts/fuzz 3

# The native accelerator against the Python reference, coverage-guided then under ASan (see scripts/fuzz).
FUZZ_SECONDS ?= 300
fuzz: install
	./scripts/fuzz $(FUZZ_SECONDS)

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pgveil-demo build *.egg-info pgveil_accel*.so
