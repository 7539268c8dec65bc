# Every target builds .venv from scratch if needed: torch first, then held by a constraint so no later
# dependency swaps in another torch build. Which torch build: a plain `pip install torch==2.13.0` (on
# Linux, PyPI serves the CUDA build; a machine with its own index may serve the CPU one). A CPU-only
# machine asks for the CPU build with
#     make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# or installs a wheel file with TORCH_SPEC=/path/to/torch-....whl. The constraint holds the installed
# distribution's version (what pip compares; `pip freeze` would write `torch @ file://...` for a wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_INDEX_URL ?=
NOTEBOOKS_OUT ?= notebooks_out

.PHONY: install demo test lint bench notebooks clean

$(BIN)/resrl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL) )$(TORCH_SPEC)
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(BIN)/resrl

install: $(BIN)/resrl

demo: install
	$(BIN)/resrl demo --out demo_out

# Two pytest-xdist workers: most tests wait on one core (tiny models, subprocesses), so two keep both cores busy.
TEST_WORKERS ?= 2

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.run_cpu

# Executes every notebook top to bottom with nbclient (as tests/test_notebooks.py does) and writes the
# executed copies to $(NOTEBOOKS_OUT)/; the committed notebooks stay without outputs.
notebooks: install
	$(BIN)/python notebooks/execute.py --out $(NOTEBOOKS_OUT)

clean:
	rm -rf $(VENV) demo_out $(NOTEBOOKS_OUT)
