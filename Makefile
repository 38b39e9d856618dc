# genart's two entry points for a newcomer: `make quickstart` and `make test`.
# Everything they need (the venv, Python packages, the headless browser) is installed here, never by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RESULTS ?= results/quickstart

.PHONY: setup browser quickstart smoke test test-fast bench clean

setup: $(VENV)/.installed

# Reinstall when the dependency list changes. A venv without pip (python3-venv missing on Debian/Ubuntu: venv
# fails after creating bin/python) is removed and made again once the package is installed.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/pip || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) 2>/dev/null; } || { \
	  rm -rf $(VENV); echo "installing python3-venv (needed by $(PYTHON) -m venv)"; \
	  (apt-get update -qq || sudo apt-get update -qq) && \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv || \
	   sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) && \
	  $(PYTHON) -m venv $(VENV); } || { rm -rf $(VENV); echo "$(PYTHON) -m venv failed" >&2; exit 1; }
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip check
	touch $@

# Debian's chromium drives the playground test (no browser download at run time), at the path the tests use.
browser:
	@test -x /usr/bin/chromium || { \
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
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done  # a failed bench fails make, not just the last

clean:
	rm -rf results .pytest_cache
