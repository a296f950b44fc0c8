# Two commands matter to a new user: `make demo` and `make test`. Everything installs from this repository's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/demo.yaml
# torch first, pinned, so nothing later can pull a CUDA build onto a CPU machine. On a laptop without a local CPU
# wheelhouse, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build from PyTorch's index.
TORCH_PIN := torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test install install-test slurm-up slurm-down bench clean-demo

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c requirements/constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c requirements/constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/synhpc demo -c $(CONFIG)

test: install-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/synhpc bench extract -c $(CONFIG)

# A single-node SLURM on loopback (slurm-wlm, munge, slurmdbd + mariadb for sacct); needs root.
slurm-up:
	bash slurm/cluster.sh up

slurm-down:
	bash slurm/cluster.sh down
