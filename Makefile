# The two commands a newcomer runs: `make demo` and `make test`. Both set up everything themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip itself at environment.yml's `- pip=` pin, as the steps' conda environment has it
PIP_PIN = $(shell sed -n 's/^ *- pip=\([0-9.]*\) *$$/\1/p' environment.yml)

.PHONY: demo test check bench format lint types imports prometheus azureml-env wrk clean

# The dependencies at environment.yml's pins (the Azure ML steps' environment, transitive ones
# included), as constraints: `run-local` and the pipeline in Azure ML run the same versions (pip
# refuses extras there). The dev tools, and what they pull in that the steps do not, at
# constraints-dev.txt's (both written by scripts/lock_environment.py): a release cannot break CI.
$(STAMP): pyproject.toml environment.yml constraints-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing aml-rollout and its dependencies into $(VENV) (first run takes a few minutes)"
	@$(PY) -m pip install -q --disable-pip-version-check "pip==$(PIP_PIN)"
	@sed -n 's/^ *- \([A-Za-z0-9_.-]*\)\(\[[^]]*\]\)\{0,1\}\(==[^ ]*\)$$/\1\3/p' environment.yml \
		> $(VENV)/constraints.txt
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' \
		-c $(VENV)/constraints.txt -c constraints-dev.txt
	@touch $(STAMP)

prometheus:
	@scripts/ensure-prometheus.sh

demo: $(STAMP) prometheus
	$(VENV)/bin/aml-rollout demo

# Two pytest workers (the 2-core machine the suite is measured on; `make test TEST_WORKERS=8`
# on a bigger one): most of the suite's time is real processes waiting on wall-clock ticks
# (Envoy, Prometheus, uvicorn, killed controllers), which overlap well. `pytest FILE` is serial.
# The 30 slowest tests are listed at the end: the suite is kept under ~10 min.
TEST_WORKERS ?= 2
test: $(STAMP) prometheus azureml-env
	$(PY) -m pytest --numprocesses $(TEST_WORKERS) --dist worksteal --durations 30

# azureml-inference-server-http in a venv of its own (it pins its own Flask and pydantic), which
# tests/scoring/test_azureml_server.py and the scoring benchmark compare our server with. Made
# here, not inside the test run, where its install took a worker's whole test timeout on a busy
# machine; when pip cannot install it, those tests skip and say why.
azureml-env: $(STAMP)
	@$(PY) -m benchmarks.azureml_env >/dev/null \
		|| echo "warning: .venv-azureml not made: the tests against azureml-inference-server-http will skip" >&2

# The benchmarks behind the README's numbers; each prints one JSON line last.
bench: $(STAMP) prometheus azureml-env wrk
	$(PY) -m benchmarks.analysis --json
	$(PY) -m benchmarks.bound --json
	$(PY) -m benchmarks.scoring --json
	$(PY) -m benchmarks.e2e_rollback --json
	$(PY) -m benchmarks.pipeline --json

# wrk is the scoring benchmark's load client (Debian package).
wrk:
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null; } \
		|| { echo "error: the scoring benchmark needs wrk: sudo apt-get install wrk" >&2; exit 1; }

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
