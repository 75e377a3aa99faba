# The two commands of the README:
#   make run   - create .venv, install the project, run the daemon on configs/demo.toml
#   make test  - create .venv, install the project with its test extra, run lint, types, tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.toml

.PHONY: run test venv lint bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "osk-daemon needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# editable_mode=compat: a path in a .pth file instead of setuptools' import finder, which
# costs every interpreter start (daemon, zygote, oskctl) ~30 ms here
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

# the daemon and every plugin start from these (PYTHONDONTWRITEBYTECODE would make each
# start compile the whole package again: ~0.4 s); up-to-date files are skipped
venv: $(VENV)/.installed
	@$(BIN)/python -m compileall -q osk_daemon

run: venv
	$(BIN)/osk-daemon run --config $(CONFIG)

lint: venv
	$(BIN)/ruff check osk_daemon tests bench configs
	$(BIN)/ruff format --check osk_daemon tests bench configs
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/spawn.py
	$(BIN)/python bench/restart.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
