# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser test lint demo demo-stop bench clean

install: $(STAMP)

# The server and its client (client/, a distribution of its own), both editable.
$(STAMP): pyproject.toml client/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./client -e '.[dev,service]'
	touch $@

# Chromium for the dashboard's browser tests, from the distribution (never `playwright install`).
# Without apt-get it only warns: those tests then skip, or fail under CI=true.
browser:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "no chromium and no apt-get: the dashboard's browser tests will skip"; exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

demo-stop: install
	$(BIN)/python examples/demo.py --stop

bench: install
	$(BIN)/python bench/merge.py

clean:
	rm -rf $(VENV) var .pytest_cache
