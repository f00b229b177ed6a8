# Two entry points for a new user (see README): `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint checkov
$(BIN)/datadream: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: pip takes 2.14.1 + torchvision 0.29.1 from local wheels where they lie on disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/datadream

install: $(BIN)/datadream

demo: install
	$(BIN)/datadream demo --out demo-run

lint: install
	$(BIN)/ruff check .

# checkov (tests/test_infra.py) pins libraries that clash with ours: it lives in its own venv.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/bin/checkov:
	$(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==3.3.30'

checkov: $(CHECKOV_VENV)/bin/checkov

test: install lint checkov
	$(BIN)/pytest -q
