# The two commands: `make train` and `make test`. Each sets up .venv on first use.
#
# The venv reuses the packages of the Python that made it ($(PYTHON)): on a GPU machine that is
# where CUDA's torch and triton live, often in a venv or conda env of its own. A .pth file in the
# new venv adds that interpreter's site-packages; --system-site-packages would not, because it
# reaches only the base installation, never a parent venv. On a CPU machine the pinned CPU builds
# from requirements-cpu.txt are installed into .venv and shadow whatever the parent has.
#
# On a CPU machine every package is installed at the exact version in constraints-cpu.txt, so a
# release published tomorrow cannot change what `make test` runs (transformers 5 once did).
# `make constraints` refreshes that file: it builds a throwaway venv from requirements-cpu.txt and
# setup.py's extras with no pins, and freezes what it got. Run `make test` after and commit both.
#
# PIP_FLAGS goes to every pip call: on an offline machine, carry wheels for what is missing and use
#   make test PIP_FLAGS="--no-index --find-links .whl --no-build-isolation"
#
# `make gpu-check` is a short GPU window's one command (bench/smoke.py): it writes at most 8 files into
# GPU_CHECK_OUT ($OUT where the machine provides one) within GPU_CHECK_BUDGET seconds; give
# GPU_CHECK_CACHE=path/to/triton-cache.tar.gz to start from an earlier window's compiled kernels.
VENV ?= .venv
PYTHON ?= python3
PIP_FLAGS ?=
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

CONSTRAINTS := constraints-cpu.txt
PIN := $(if $(HAS_GPU),,-c $(CONSTRAINTS))

GPU_CHECK_BUDGET ?= 390
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),bench/results/gpu-check)
GPU_CHECK_CACHE ?=

.PHONY: train test bench gpu-check constraints

$(VENV)/.installed: setup.py requirements-cpu.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
		> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent-env.pth"
	$(if $(HAS_GPU),,$(PY) -m pip install $(PIP_FLAGS) $(PIN) -r requirements-cpu.txt)
	$(PY) -m pip install $(PIP_FLAGS) $(PIN) -e ".[test,bench]"
	touch $@

train: $(VENV)/.installed
	$(PY) train_gpt2.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)

gpu-check: $(VENV)/.installed
	$(PY) -m bench smoke --budget $(GPU_CHECK_BUDGET) --out $(GPU_CHECK_OUT) \
		$(if $(GPU_CHECK_CACHE),--triton-cache $(GPU_CHECK_CACHE)) $(ARGS)

constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install $(PIP_FLAGS) -r requirements-cpu.txt ".[test,bench]"
	{ echo "# Exact versions for CPU machines (CI and development), used by make as pip -c. Made by"; \
	  echo "# \`make constraints\` on $$(date -u +%F) with $$(.venv-constraints/bin/python -V)."; \
	  .venv-constraints/bin/python -m pip freeze --exclude gpt-triton --exclude pip --exclude setuptools; \
	} > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf .venv-constraints
