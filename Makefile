# Set-up and the two jobs the README names. PYTHON must be 3.11 or newer.
PYTHON ?= python3
VENV ?= .venv
# With PHOTOS unset, the demo is fully offline: it generates a small shapes folder and uses the model
# shipped with retriever. With PHOTOS set, it indexes that folder with the public COCO checkpoints
# (downloaded once from the Hugging Face hub).
PHOTOS ?=
DEMO ?= demo-data

.PHONY: setup demo test test-fast lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Index a folder of images, then search it by text, on the embedded SQLite default.
ifeq ($(PHOTOS),)
demo: QUERY ?= a large yellow circle left of a large purple square
demo: setup
	$(VENV)/bin/retriever datasets shapes --out $(DEMO)/shapes --images 200 --seed 7 --split test
	$(VENV)/bin/retriever index $(DEMO)/shapes --model shapes --index-dir $(DEMO)/index
	@echo 'searching for: $(QUERY)'
	$(VENV)/bin/retriever search "$(QUERY)" --k 5 --index-dir $(DEMO)/index
else
demo: QUERY ?= a dog playing in the snow
demo: setup
	$(VENV)/bin/retriever index "$(PHOTOS)" --model coco
	@echo 'searching for: $(QUERY)'
	$(VENV)/bin/retriever search "$(QUERY)"
endif

# The whole test suite, linters included. pytest's exit 5 (no tests ran) fails like any other failure.
# tests/prepare.sh first starts PostgreSQL and installs Chromium and its driver where they are missing.
test: setup
	tests/prepare.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# Everything but the slow tests, the browser, PostgreSQL and the linters: a few minutes, no services.
test-fast: setup
	HF_HUB_OFFLINE=1 RETRIEVER_SKIP_BROWSER=1 RETRIEVER_SKIP_POSTGRES=1 \
		$(VENV)/bin/python -m pytest -q -m "not slow" --ignore=tests/test_quality.py --ignore=tests/browser

# ruff, mypy (strict, package and tests) and the import-layer contracts, as `make test` runs them.
lint: setup
	$(VENV)/bin/python -m tests.lint
