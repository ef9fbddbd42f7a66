# simcot: set-up, the embedded default run, and the tests.
#   make run      set up .venv and train + evaluate the default (tiny-llama, CoT-SFT, CPU, ~3 min)
#   make test     set up .venv and run the test suite
#   make measure  re-measure every figure of README's "Measured" section and re-render it
#                 (MEASURE_ARGS="--only default,semcot" or "--skip suite" for a subset)
# A GPU machine picks its own torch build:  make setup TORCH_SPEC="torch==2.13.0" ALLOW_NVIDIA=1
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ALLOW_NVIDIA ?= 0
BIN := $(VENV)/bin
# the suite in parallel workers (pytest-xdist), at most 4, one torch thread each (tests/conftest.py). Run in one
# process it kept 2 cores two-thirds busy (12.2 CPU-minutes in 9.3 minutes): DeepSpeed launches and CLI runs
# start processes and wait on them, time a second worker fills (7.0 minutes in two workers)
PYTEST_ARGS ?= -q -n auto --maxprocesses=4
MEASURE_ARGS ?=

.PHONY: setup run test measure bench clean

setup: $(VENV)/.installed

# torch first and pinned, so nothing later resolves an unpinned torch (several GB of CUDA wheels).
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23" "setuptools>=64"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m simcot.launchers.check_env --allow-nvidia=$(ALLOW_NVIDIA) --torch-spec="$(TORCH_SPEC)"
	touch $@

run: setup
	$(BIN)/simcot train

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

measure: setup
	$(BIN)/python benchmarks/measure.py $(MEASURE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
