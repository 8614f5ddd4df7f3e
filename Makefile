# The two commands: `make demo` and `make test`. Both set up everything they need in .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check

.PHONY: demo test test-fast bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned: a bare `torch` (pulled in by trl/accelerate) would fetch a multi-GB CUDA build.
$(VENV)/.installed-test: pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -c requirements.lock -e '.[test,train]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) install -c requirements.lock -e '.[demo]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/stepforge run

# Chromium renders the HTML report in its screenshot test; without root or apt that test skips and says why.
# Label Studio (the review server) needs a venv of its own: its pins conflict with Prefect's.
test: $(VENV)/.installed-test
	-bash .ci/install-chromium
	STEPFORGE_LABEL_STUDIO_VENV=$(CURDIR)/.venv-label-studio $(BIN)/python -c "from stepforge.flows.review_server import ensure_label_studio; ensure_label_studio()"
	STEPFORGE_LABEL_STUDIO_VENV=$(CURDIR)/.venv-label-studio $(BIN)/python -m pytest

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/labellers.py synthetic

# Re-pin after changing dependencies: resolves in a fresh venv, writes requirements.lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet torch==2.13.0 && .venv-lock/bin/pip install --quiet '.[test,train,demo]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^stepforge' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) stepforge-data .pytest_cache
