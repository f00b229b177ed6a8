# Two entry points for a new user (see README): `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint checkov smoke-312
# Quiet: one line, then pip's errors only (-qq); `make install PIP_QUIET=` shows pip's own output.
PIP_QUIET ?= -qq
$(BIN)/datadream: pyproject.toml
	@echo "installing DataDream and its dependencies into $(VENV) (once; about 2-3 min)"
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install $(PIP_QUIET) --upgrade pip
	@# torch first: pip takes 2.14.1 + torchvision 0.29.1 from local wheels where they lie on disk
	@$(BIN)/pip install $(PIP_QUIET) torch==2.14.1 torchvision==0.29.1
	@$(BIN)/pip install $(PIP_QUIET) -e '.[dev]'
	@touch $(BIN)/datadream

install: $(BIN)/datadream

demo: install
	@$(BIN)/datadream demo --out demo-run

lint: install
	$(BIN)/ruff check .

# checkov (tests/test_infra.py) pins libraries that clash with ours: it lives in its own venv.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/bin/checkov:
	$(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==3.3.30'

checkov: $(CHECKOV_VENV)/bin/checkov

# Python 3.12: a non-editable install (the wheel, presets as package data) and the demo, from a folder
# outside the repository so nothing can be read from the source tree.
# (a python3.12 that runs; a pyenv shim without the version selected does not)
PY312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo /root/.pyenv/versions/3.12.1/bin/python3.12)
VENV312 ?= .venv-312
$(VENV312)/bin/datadream: pyproject.toml
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/pip install -q --upgrade pip
	$(VENV312)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV312)/bin/pip install -q .
	touch $(VENV312)/bin/datadream

smoke-312: $(VENV312)/bin/datadream
	cd "$$(mktemp -d)" && $(abspath $(VENV312))/bin/datadream -q demo --in-process --out smoke-312-run

test: install lint checkov
	$(BIN)/pytest -q --durations=15
	$(MAKE) smoke-312
