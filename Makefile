# fastflow: `make demo` samples molecules with the default model; `make test` runs the test suite.
# Both create .venv, install torch (CPU 2.13.0 when the venv has none) and build fastflow's C++ extension.
#
# GPU users: put your CUDA torch into the venv first (e.g. `python -m venv .venv && .venv/bin/pip install torch
# --index-url https://download.pytorch.org/whl/cu128`), or point VENV at an environment that has it; the
# Makefile never replaces an existing torch. `make install TRITON=1` adds Triton for the GPU kernels.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
N ?= 100
STEPS ?= 100
SEED ?= 0

.PHONY: install install-dev install-moses demo lint test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q "setuptools>=64" wheel ninja
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

# mace-torch for tests/tp/test_mace.py and the MACE tests: WITHOUT its dependencies (it pins e3nn==0.4.4, dev needs
# e3nn>=0.5; 0.3.16 runs on e3nn 0.6), then the ones it imports (torch is already there, so none replaces it).
MACE_DEPS := ase configargparse GitPython h5py lmdb matscipy opt_einsum orjson pandas prettytable python-hostlist \
	pyYAML torch-ema torchmetrics tqdm

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/pip install -q --no-deps "mace-torch==0.3.16"
	$(BIN)/pip install -q $(MACE_DEPS)
	touch $@

install: $(VENV)/.installed

# MOSES SMILES for `fastflow data moses3d`: the molsets wheel, WITHOUT its dependencies (they pull pomegranate,
# which does not build on Python 3.11, fcd_torch and an unpinned torch); fastflow only reads its csv.gz files.
install-moses: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps molsets==0.3.1

install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/fastflow sample --n $(N) --steps $(STEPS) --seed $(SEED) --out demo.sdf

# ruff's lint and format check first: a style break fails in seconds, not after the suite.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench_cache_forecast.py
	$(BIN)/python bench/bench_semla_forward.py

clean:
	rm -rf build *.egg-info fastflow/_C*.so demo.sdf
