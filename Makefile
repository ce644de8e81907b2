# Set-up is part of every target: a virtual environment in .venv with fxsparse installed (editable) and its
# test and demo extras. PYTHON may point at another interpreter (3.10 or newer).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxsparse-installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fxsparse demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/models.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
