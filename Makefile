# Two commands on a fresh machine: `make demo` (4.5-9 minutes on a 2-core CPU; `make demo-full` is the bigger run) and
# `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo demo-full test test-fast bench clean

$(STAMP): pyproject.toml requirements/constraints-ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Dev/CI pin torch==2.13.0 (a CPU wheel); never pull a CUDA build here.
	$(BIN)/python -m pip install --quiet -c requirements/constraints-ci.txt -e '.[labeler,trainer,export,gguf,s3,hf,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python scripts/demo.py

demo-full: venv
	$(BIN)/python scripts/demo.py --full

test: venv
	$(BIN)/python -m pytest

# The inner loop: format, encodings, losses, masks, alignment, configs and refusals; no S3 server, no built-in
# teacher, no process of its own, one shared local Ray and label set (tests/conftest.py). `make test` runs all.
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf runs .pytest_cache
