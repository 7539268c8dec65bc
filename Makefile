# Every target builds .venv from scratch if needed: torch first (the CPU wheel), then held by a
# constraint so no later dependency swaps in a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench notebooks clean

$(BIN)/resrl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(BIN)/resrl

install: $(BIN)/resrl

demo: install
	$(BIN)/resrl demo --out demo_out

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.run_cpu

clean:
	rm -rf $(VENV) demo_out
