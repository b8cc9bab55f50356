# Set-up and the two jobs the README names. PYTHON must be 3.11 or newer.
PYTHON ?= python3
VENV ?= .venv
# With PHOTOS unset, the demo is fully offline: it generates a small shapes folder and uses the model
# shipped with retriever. With PHOTOS set, it indexes that folder with the public COCO checkpoints
# (downloaded once from the Hugging Face hub).
PHOTOS ?=
DEMO ?= demo-data

.PHONY: setup demo test test-fast lint train-shapes

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

# Fine-tune the shipped shapes model on images drawn across the spec's whole envelope (issue: the
# shipped model). Hours on a CPU: it runs at low priority and resumes from train-runs/ when run again.
TRAIN_OUT ?= train-runs/shapes-v3-envelope
train-shapes: setup
	@[ -f train-runs/data/train/dataset.json ] || HF_HUB_OFFLINE=1 nice -n 19 $(VENV)/bin/retriever datasets shapes \
		--out train-runs/data/train --images 12000 --seed 101 --split train
	HF_HUB_OFFLINE=1 nice -n 19 $(VENV)/bin/retriever train --karpathy train-runs/data/train/dataset.json \
		--out $(TRAIN_OUT) --prefilter-init retriever/models/shapes/prefilter \
		--reranker-init retriever/models/shapes/reranker --prefilter-steps 1000 --prefilter-lr 2e-4 \
		--reranker-steps 4000 --reranker-lr 1e-4 --render envelope --seed 3 --device cpu
