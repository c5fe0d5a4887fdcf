# The two commands: `make train` and `make test`. Each sets up .venv on first use.
#
# The venv reuses the packages of the Python that made it ($(PYTHON)): on a GPU machine that is
# where CUDA's torch and triton live, often in a venv or conda env of its own. A .pth file in the
# new venv adds that interpreter's site-packages; --system-site-packages would not, because it
# reaches only the base installation, never a parent venv. On a CPU machine the pinned CPU builds
# from requirements-cpu.txt are installed into .venv and shadow whatever the parent has.
#
# PIP_FLAGS goes to every pip call: on an offline machine, carry wheels for what is missing and use
#   make test PIP_FLAGS="--no-index --find-links .whl --no-build-isolation"
VENV ?= .venv
PYTHON ?= python3
PIP_FLAGS ?=
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: train test bench

$(VENV)/.installed: setup.py requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
		> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent-env.pth"
	$(if $(HAS_GPU),,$(PY) -m pip install $(PIP_FLAGS) -r requirements-cpu.txt)
	$(PY) -m pip install $(PIP_FLAGS) -e ".[test,bench]"
	touch $@

train: $(VENV)/.installed
	$(PY) train_gpt2.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)
