# Two commands do everything on a fresh clone:
#   make demo   the whole system trading in paper mode over the bundled data, about a minute, no servers
#               (make demo LIVE=1: the same on the exchanges' live public feeds)
#   make test   run the test suite against real Redis/PostgreSQL/chDB
# and `make run` starts the system on the embedded stack until Ctrl-C.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py services/collector/_cbook.c shared/_clevels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/arb demo $(if $(LIVE),--live)

run: setup
	$(BIN)/arb up

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check shared services tests backtest
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
