# pinfer: `make up` runs the service, `make test` runs every test. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch comes from the CPU-only wheel index, like in deploy/Dockerfile: on Linux the PyPI `torch`
# wheel is the CUDA build and pulls ~3 GB of nvidia-* packages a CPU service never loads. Point
# TORCH_INDEX_URL at a mirror of that index, or set TORCH_PIP_ARGS to install torch your own way
# (e.g. TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cu126'). Only torch itself
# comes from there (--no-deps: one request to that index); its dependencies come with the rest.
# Where the index cannot be reached, pip still takes a matching wheel from PIP_FIND_LINKS.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS  ?= --no-deps --index-url $(TORCH_INDEX_URL)
# The exact torch requirement (e.g. torch==2.13.0) from pyproject.toml's `worker` extra.
TORCH_REQ = $(shell $(PYTHON) -c "import tomllib; print(next(r for r in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['worker'] if r.startswith('torch')))")

# Model variants `make model` and `make up` export (the same options as `pinfer export-model`), e.g.
#   make up EXPORT_PRECISION=fp32,int8 EXPORT_RUNTIME=torchscript,onnx EXPORT_CALIBRATION=../shared/corpus/photos
EXPORT_PRECISION   ?= fp32
EXPORT_RUNTIME     ?= torchscript
EXPORT_CALIBRATION ?=
EXPORT_ARGS := --precision $(EXPORT_PRECISION) --runtime $(EXPORT_RUNTIME) \
               $(if $(EXPORT_CALIBRATION),--calibration $(EXPORT_CALIBRATION))

.PHONY: up test unit integration bench soak model install clean settings-table

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH_REQ)'
	$(PY) -m pip install --quiet -e '.[worker,server,test]'
	# the client is a distribution of its own (client/pyproject.toml): `pinfer ingest`, tests and bench use it
	$(PY) -m pip install --quiet -e ./client
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(PY) -m pinfer.cli export-model --if-missing --fallback-random-init $(EXPORT_ARGS)

up: $(STAMP)
	$(PY) -m pinfer.cli up $(EXPORT_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

# `make bench` = a full run, published (bench/results/ + README block); `make bench ARGS=--quick`
# or `ARGS='e2e --variants torchscript-*'` for a subset (written to bench/out/, README untouched).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench --publish $(ARGS)

# 10 minutes at ~70 % of capacity with a worker SIGKILL every 2 minutes (not in CI): RSS, p50/p99, lost
soak: $(STAMP)
	$(PY) -m bench.soak

settings-table: $(STAMP)
	$(PY) -m pinfer.cli settings --markdown

clean:
	rm -rf $(VENV) weights/build run
