# pinfer: `make up` runs the service, `make test` runs every test. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: up test unit integration bench model install clean settings-table

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,server,test]'
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(PY) -m pinfer.cli export-model --if-missing --fallback-random-init

up: $(STAMP)
	$(PY) -m pinfer.cli up

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

settings-table: $(STAMP)
	$(PY) -m pinfer.cli settings --markdown

clean:
	rm -rf $(VENV) weights/build run
