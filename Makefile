# gptpipe: `make demo` runs the main job, `make test` runs the tests. Both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

# No apt packages are needed for install, demo or test. scripts/perf_analyzer.sh (by hand,
# not part of the tests) installs libb64-0d, the one library the perf_analyzer binary lacks.
$(STAMP): pyproject.toml scripts/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c scripts/constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .cache
