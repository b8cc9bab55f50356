# Set-up and the two jobs the README names. PYTHON must be 3.11 or newer.
PYTHON ?= python3
VENV ?= .venv
PHOTOS ?= $(HOME)/Pictures
QUERY ?= a dog playing in the snow

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Index a folder of photos, then search it by text, on the embedded SQLite default.
demo: setup
	$(VENV)/bin/retriever index "$(PHOTOS)"
	$(VENV)/bin/retriever search "$(QUERY)"

# The whole test suite, linters included. pytest's exit 5 (no tests ran) fails like any other failure.
test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q
