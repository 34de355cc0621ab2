# Every target sets itself up on a fresh machine: make demo, make test.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install demo test lint clean

$(BIN)/histocsc: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(BIN)/histocsc

install: $(BIN)/histocsc

demo: install
	$(BIN)/histocsc demo --out demo-output

test: lint
	$(BIN)/pytest -q

# ruff, the import layers contract ([tool.importlinter]) and declared dependencies ([tool.deptry])
lint: install
	$(BIN)/ruff check histocsc tests scripts
	$(BIN)/lint-imports
	$(BIN)/deptry .

clean:
	rm -rf $(VENV) demo-output .pytest_cache
