# Every target sets itself up on a fresh machine: make demo, make test.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install demo test lint clean

$(BIN)/histocsc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/histocsc

install: $(BIN)/histocsc

demo: install
	$(BIN)/histocsc demo --out demo-output

test: lint
	$(BIN)/pytest -q

# ruff, then the import layers contract in pyproject.toml ([tool.importlinter])
lint: install
	$(BIN)/ruff check histocsc tests scripts
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo-output .pytest_cache
