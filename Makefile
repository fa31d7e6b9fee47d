# The README's commands. Every install goes through constraints.txt.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-gpu gpu-check lint demo bench install clean

# Install only when pyproject.toml or constraints.txt changed since the last install.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two xdist workers. The modules with Ray tests form two groups (tests/conftest.py,
# RAY_MODULES), each run by one worker one test at a time; the other modules fill in.
XDIST := -n 2

test: $(STAMP) lint
	$(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

# The tests not marked slow: the development loop.
test-fast: $(STAMP)
	$(VENV)/bin/pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The CUDA tests (tests/gpu, marker gpu), which `make test` never collects. They need an
# NVIDIA GPU; GPU_TEST_DEVICE=cpu runs them on CPU. PY_GPU: a Python with torch and
# torchvision already there (a GPU machine's own), instead of this venv. A PYTHONPATH
# already set (the device's carried wheels, e.g. /tmp/site with pycocotools) is kept.
PY_GPU ?= $(PY)
test-gpu:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY_GPU) -m pytest -m gpu tests/gpu -p no:cacheprovider $(PYTEST_ARGS)

# Every GPU figure in one run of at most 8 minutes: bench/results/<device>-gpu.json.
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY_GPU) bench/gpu_check.py $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(VENV)/bin/maskrcnn demo $(DEMO_ARGS)

bench: $(STAMP)
	@set -e; for b in bench/*_bench.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
