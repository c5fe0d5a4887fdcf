# The two commands: `make train` and `make test`. Each sets up .venv on first use.
# On a machine with an NVIDIA GPU the venv sees the system's torch/triton (--system-site-packages);
# on a CPU machine it installs the pinned CPU builds from requirements-cpu.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: train test bench

$(VENV)/.installed: setup.py requirements-cpu.txt
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(if $(HAS_GPU),,$(PY) -m pip install -r requirements-cpu.txt)
	$(PY) -m pip install -e ".[test,bench]"
	touch $@

train: $(VENV)/.installed
	$(PY) train_gpt2.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)
