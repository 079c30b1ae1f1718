# One command each: `make demo` (set up, compare optimizers on the built-in tasks) and `make test`
# (the docs site built with `mkdocs build --strict`, then the suite's default tier; `make test-all`
# adds the slow tier).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCAL_PLUGINS := $(wildcard contrib/example-plugin contrib/kron-cayley)

.PHONY: setup demo docs test test-all bench

$(BIN)/rollfast: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,docs,compare]' $(addprefix -e ./,$(LOCAL_PLUGINS))
	touch $@

setup: $(BIN)/rollfast

demo: setup
	$(BIN)/rollfast compare --json --out rollfast-compare

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: docs
	$(BIN)/python -m pytest -q -n auto -m "not slow"

# The slow tier too: every kron mode / Optax family where the default tier samples them
# (run by hand before a release and in a scheduled job; ~2x the default tier's time).
test-all: docs
	$(BIN)/python -m pytest -q -n auto

bench: setup
	for b in bench/[a-z]*.py; do n=$$(basename $$b .py); [ $$n = common ] || PATH=$(BIN):$$PATH $(BIN)/python -m bench.$$n; done
