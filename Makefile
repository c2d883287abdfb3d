# Two commands for a newcomer: `make up` (run the stack) and `make test` (run every test).
# Both install what they need into .venv on first use; Kafka jars are fetched on first start.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up down status test test-faults install lint format bench clean

# The first install takes a few minutes (chdb, the embedded ClickHouse, is about 500 MB): say so,
# and hide setuptools' "Editable installation" warning, which is about a layout we do not have.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "==> Creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> Installing Tollgate and its dependencies into $(VENV)"
	@echo "    (first time: about 1-3 minutes, mostly downloading chdb, the embedded ClickHouse;"
	@echo "     later runs skip this step until pyproject.toml changes)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)
	@echo "==> Installed into $(VENV)."

install: $(STAMP)

## Run the whole local stack in the foreground (Ctrl-C stops everything).
up: $(STAMP)
	$(BIN)/tollgate up

## Stop the stack `make up` runs (from another terminal; same as Ctrl-C in its own).
down: $(STAMP)
	$(BIN)/tollgate down

## Each component of the stack `make up` runs: running, or down and restarting (exit code 3).
status: $(STAMP)
	$(BIN)/tollgate status

## Lint, type-check and check the import contracts, then unit + integration tests; starts (and stops) the local Kafka the tests use.
## The unit tests (no services) run on TEST_WORKERS processes (pytest-xdist; each test file on one:
## a module's fixtures are built once); then the integration and fault tests, one at
## a time against one broker. Both runs always run; make fails if either failed.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@rc=0; \
	echo "$(BIN)/python -m pytest tests/unit -n $(TEST_WORKERS) --dist loadfile -ra -p no:cacheprovider"; \
	$(BIN)/python -m pytest tests/unit -n $(TEST_WORKERS) --dist loadfile -ra -p no:cacheprovider || rc=1; \
	echo "$(BIN)/python -m pytest tests/integration tests/faults -ra -p no:cacheprovider"; \
	$(BIN)/python -m pytest tests/integration tests/faults -ra -p no:cacheprovider || rc=1; \
	exit $$rc

## Every row of the fault table at full scale (>= 10 dispatcher and 10 spend-worker kills
## under load, an 85 s sink stall, ...); about 30 minutes. Prints the table at the end and
## writes it as Markdown to $(FAULT_TABLE) (docs/FAULTS.md says how to read it).
FAULT_TABLE ?= .tollgate/fault-table.md
test-faults: $(STAMP)
	@mkdir -p $(dir $(FAULT_TABLE))
	$(BIN)/python -m pytest tests/faults --faults=full -ra -p no:cacheprovider \
		--fault-table=$(FAULT_TABLE)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf .tollgate .pytest_cache .mypy_cache .ruff_cache
