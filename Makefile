# The two commands a newcomer runs: `make demo` and `make test`. Both set up everything themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check format lint types imports prometheus clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing aml-rollout and its dependencies into $(VENV) (first run takes a few minutes)"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

prometheus:
	@scripts/ensure-prometheus.sh

demo: $(STAMP) prometheus
	$(VENV)/bin/aml-rollout demo

test: $(STAMP) prometheus
	$(PY) -m pytest

format:
	$(VENV)/bin/ruff format .

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

types: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports

check: lint types imports test

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis runs
