# Set-up and everyday commands. `make demo` and `make test` do all the set-up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := data/demo
DEMO_RUN ?= runs/demo
# extra config overrides for the demo's training run, e.g. DEMO_ARGS="train.steps=80"
DEMO_ARGS ?=
# torch and torchvision are installed first and pinned here: on the project's CPU machines these
# releases lie on local disk for pip (a pip constraints file caps torch at them).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# DeepSpeed compiles a small CPU op on first use; keep its build beside this venv, so that two
# checkouts (two venvs) do not keep invalidating one shared cache.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup demo demo-data test clean help slurm-up

help:
	@echo "make demo   - install, build demo shards, pretrain CLIP on 2 CPU ranks, evaluate"
	@echo "make test   - install if needed, run the test suite"
	@echo "make setup  - create $(VENV) and install the project (idempotent)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test,demo]"
	@touch $(STAMP)

demo-data: $(STAMP)
	$(PY) -m data_tools.demo --output $(DEMO_DIR)
	@for split in train val; do \
	  $(PY) -m data_tools build --input $(DEMO_DIR)/$$split.jsonl --output $(DEMO_DIR)/shards/$$split \
	    --shard-size 200 --map image=png --map caption=txt --map label=cls || exit 1; \
	done

demo: demo-data
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \
	  -m pretrain.train --config configs/quickstart.yaml output_dir=$(DEMO_RUN) \
	  "data.train.urls=$(DEMO_DIR)/shards/train/shard-{000000..000007}.tar" \
	  "data.val.urls=$(DEMO_DIR)/shards/val/shard-{000000..000001}.tar" $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# A one-node Slurm on loopback for the launcher's tests (root or sudo, apt): installs slurm-wlm and
# munge when missing, starts munged, slurmctld and slurmd, waits until the node is idle. Idempotent.
slurm-up:
	bash launch/slurm_local/start.sh

clean:
	rm -rf runs $(DEMO_DIR) .pytest_cache
