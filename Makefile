# Two entry points (README): `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install system clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchseg demo --output demo-output

# Style, types, and the layering (import contracts in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check batchseg tests jobs bench
	$(VENV)/bin/ruff format --check batchseg tests jobs bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The report test opens the HTML report in a real headless browser: Debian's chromium package.
system:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		{ echo "make test needs Debian's chromium package (apt-get install chromium)"; exit 1; }

test: system lint
	$(VENV)/bin/pytest -q -n 2 --durations=25

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
