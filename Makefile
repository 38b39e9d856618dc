# genart's two entry points for a newcomer: `make quickstart` and `make test`.
# Everything they need (the venv, Python packages, the headless browser) is installed here, never by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RESULTS ?= results/quickstart

.PHONY: setup browser quickstart smoke test test-fast bench clean

setup: $(VENV)/.installed

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip check
	touch $@

# Debian's chromium drives the playground test (no browser download at run time).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq || sudo apt-get update -qq) && \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || \
	   sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium); }

# The main job on the embedded local Ray: sample data -> prepare -> train -> samples -> stylize -> score -> report.
quickstart: setup
	$(BIN)/python workflows/quickstart.py --out $(RESULTS)

# The pipeline's subcommands once (not serve, recommend, submit, jobs) on 40 synthetic 16 px images (train as a
# dcgan --dry-run; workflows/smoke.py --all-families dry-runs every family), PASS/FAIL per step.
smoke: setup
	$(BIN)/python workflows/smoke.py

test: setup browser
	$(BIN)/python -m pytest tests

# Everything but the slow Ray Train fits and long pipelines.
test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b; done

clean:
	rm -rf results .pytest_cache
