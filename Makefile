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

.PHONY: up test unit integration bench soak model install clean settings-table lock audit

# Everything but torch comes from the lock requirements/dev.txt, every file checked against its
# sha256 (--require-hashes); torch (above) by its exact version, see "Lock files" below for why.
# The packages themselves go in last without dependencies and without build isolation (the locked
# setuptools builds them), so nothing unlocked is ever resolved. The client is a distribution of its
# own (client/pyproject.toml; its requests, urllib3 and tqdm are in the lock): `pinfer ingest`,
# tests and bench use it.
$(STAMP): pyproject.toml client/pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH_REQ)'
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e ./client
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
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
$(BENCH_STAMP): $(STAMP) requirements/all.txt
	$(PY) -m pip install --quiet --require-hashes -r requirements/all.txt
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

# ------------------------------------------------------------------------------------ lock files
# requirements/<name>.txt: every dependency pinned, with the sha256 of every file of that release
# (`uv pip compile --generate-hashes`), resolved for CPython 3.11 on Linux x86_64 (the platform of
# deploy/Dockerfile and CI; elsewhere a package missing from the lock is an install error, never an
# unlocked download). `make lock`
# regenerates them, keeping the pins it can (`make lock UPGRADE=1` moves everything to the newest
# release that fits pyproject.toml); tests/unit/test_lock.py fails while they lag behind it.
#
# torch is left OUT of every lock and installed by its exact version (pyproject.toml's pin) in a
# step of its own: TORCH_PIP_ARGS may take it from another index (CUDA, ROCm) or a mirror that
# rebuilds wheels, each file with its own sha256, and the CPU index's hashes for every platform the
# image is built on (x86_64, aarch64) cannot be taken from where that index is unreachable (`make
# lock` then sees only PIP_FIND_LINKS), so a torch hash in the lock would break some install that
# works today. Its dependencies (sympy, networkx, jinja2, ...) ARE locked with their hashes.
#
# LOCKS: name:extras[:project file]. The first is the superset, compiled alone; every other is
# constrained by it, so one package has one version in all of them (the image runs what CI tested).
# A further project adds a line here, e.g. `client::client/pyproject.toml`.
LOCKS := all:worker,server,test,bench \
         dev:worker,server,test \
         worker:worker \
         worker-onnx:worker-onnx
LOCK_PLATFORM := --python-version 3.11 --python-platform x86_64-manylinux_2_28
# Where `make lock` finds torch's metadata (torch's own dependencies are resolved from it): pip's
# PIP_FIND_LINKS when set, otherwise the CPU index's page of torch wheels (only torch comes from it).
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(TORCH_INDEX_URL)/torch/)
TOOLS       := $(VENV)/tools
TOOLS_STAMP := $(TOOLS)/.installed
UV_COMPILE  = $(TOOLS)/bin/uv pip compile --quiet --generate-hashes $(LOCK_PLATFORM) \
              --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)

# uv and pip-audit live in a venv of their own (inside .venv), installed from their own lock.
$(TOOLS_STAMP): requirements/tools.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --require-hashes -r requirements/tools.txt
	touch $(TOOLS_STAMP)

lock: $(TOOLS_STAMP)
	$(UV_COMPILE) requirements/tools.in -o requirements/tools.txt
	@set -e; base=requirements/$(firstword $(subst :, ,$(firstword $(LOCKS)))).txt; \
	for spec in $(LOCKS); do \
	  name=$${spec%%:*}; rest=$${spec#*:}; extras=$${rest%%:*}; src=pyproject.toml; \
	  case "$$rest" in *:*) src=$${rest#*:};; esac; \
	  out=requirements/$$name.txt; constrain=""; [ "$$out" = "$$base" ] || constrain="-c $$base"; \
	  echo "lock $$out <- $$src [$$extras]"; \
	  $(UV_COMPILE) "$$src" $$(for e in $$(echo "$$extras" | tr , ' '); do printf -- '--extra %s ' "$$e"; done) \
	    $$constrain --no-emit-package torch $(foreach l,$(TORCH_FIND_LINKS),--find-links $(l)) -o "$$out"; \
	done

# Known vulnerabilities in every locked release (and the torch pin), from PyPI's advisory data
# (AUDIT_SERVICE=osv for OSV's). --strict: a release the service cannot look up is an error, never a
# silent pass. A vulnerability that cannot be fixed yet: AUDIT_IGNORE='GHSA-... PYSEC-...' (say why
# where you set it).
AUDIT_SERVICE ?= pypi
AUDIT_IGNORE  ?=
AUDIT = $(TOOLS)/bin/pip-audit --strict --progress-spinner off --disable-pip \
        --vulnerability-service $(AUDIT_SERVICE) $(foreach v,$(AUDIT_IGNORE),--ignore-vuln $(v))
audit: $(TOOLS_STAMP)
	@set -e; for f in requirements/*.txt; do echo "pip-audit $$f"; $(AUDIT) --require-hashes -r "$$f"; done
	echo '$(TORCH_REQ)' > $(TOOLS)/torch-pin.txt && $(AUDIT) --no-deps -r $(TOOLS)/torch-pin.txt
