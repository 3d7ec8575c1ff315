VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test lint smoke bench clean browser

# The venv is made, and the package installed with its test and lint extras, when missing.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $@

run: $(VENV)/.installed  ## the service with its embedded default (demo tools, demo project)
	$(PY) -m streamsvc server $(ARGS)

test: $(VENV)/.installed browser  ## the whole test suite
	$(PY) -m pytest -q $(ARGS)

# The page's tests drive Debian's chromium through Playwright (never a browser Playwright downloads).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		sudo=""; if [ "$$(id -u)" -ne 0 ]; then sudo="sudo"; fi; \
		echo "installing Debian's chromium for the browser tests (apt-get)"; \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
		|| echo "no chromium: the browser tests will be skipped (they fail under CI=true)"; \
	fi

smoke: $(VENV)/.installed  ## a real service on a free port: every demo tool end to end, then SIGTERM
	$(PY) scripts/smoke.py

bench: $(VENV)/.installed  ## scripts/bench.py: streamsvc against the Node seed and the ceilings (ARGS=--quick ...)
	$(PY) scripts/bench.py $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check streamsvc tests scripts
	$(VENV)/bin/ruff format --check streamsvc tests scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
