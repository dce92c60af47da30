# The two set-up commands of the README. Each creates .venv when it is missing (or when
# pyproject.toml changed since the last install) and then runs; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.clear-installed
OUT ?= clear-output

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clear-train demo --out $(OUT)/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/python -m pytest
