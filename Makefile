# One command to set up and run, one to test. The virtual environment is created if missing.
VENV   ?= .venv
PYTHON ?= python3
# The CPU build of torch that this project is tested with; pip would otherwise pull a multi-GB
# CUDA build. On a GPU machine: make install TORCH="torch" (or your CUDA wheel).
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.ganpipe-installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ganpipe run $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/run_default.py $(ARGS)

clean:
	rm -rf $(VENV) ganpipe-runs .pytest_cache .ruff_cache *.egg-info
