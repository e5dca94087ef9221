# pinfer: `make up` runs the service, `make test` runs every test. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: up test unit integration bench soak model install clean settings-table

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

bench: $(STAMP)
	$(PY) -m bench.run

# 10 minutes at ~70 % of capacity with a worker SIGKILL every 2 minutes (not in CI): RSS, p50/p99, lost
soak: $(STAMP)
	$(PY) -m bench.soak

settings-table: $(STAMP)
	$(PY) -m pinfer.cli settings --markdown

clean:
	rm -rf $(VENV) weights/build run
