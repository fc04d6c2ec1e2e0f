# The service on one machine, from nothing but Python 3.11. Configuration: NAD_* environment variables (README).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up down test demo

# The environment: made when missing, refreshed when pyproject.toml or constraints.txt changes. constraints.txt
# holds every package at the version the tests last passed with (README, "Dependencies").
$(BIN)/nad: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $@

## up: start database, broker, worker and API in the background; prints the URL and an API key
up: $(BIN)/nad
	$(BIN)/python scripts/service.py up

## down: stop what `make up` started
down: $(BIN)/nad
	$(BIN)/python scripts/service.py down

## test: the test suite (exit 5, no test collected, is a failure)
test: $(BIN)/nad
	$(BIN)/pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests collected" >&2; exit 1; fi; exit $$status

## demo: send a real backdoored model through the running service and print the before/after table
demo: $(BIN)/nad
	$(BIN)/python scripts/demo.py
