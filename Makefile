# pinfer: `make up` runs the service, `make test` runs every test. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Model variants `make model` and `make up` export (the same options as `pinfer export-model`), e.g.
#   make up EXPORT_PRECISION=fp32,int8 EXPORT_RUNTIME=torchscript,onnx EXPORT_CALIBRATION=../shared/corpus/photos
EXPORT_PRECISION   ?= fp32
EXPORT_RUNTIME     ?= torchscript
EXPORT_CALIBRATION ?=
EXPORT_ARGS := --precision $(EXPORT_PRECISION) --runtime $(EXPORT_RUNTIME) \
               $(if $(EXPORT_CALIBRATION),--calibration $(EXPORT_CALIBRATION))

.PHONY: up test unit integration bench model install clean settings-table

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,server,test]'
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

bench: $(STAMP)
	$(PY) -m bench.run

settings-table: $(STAMP)
	$(PY) -m pinfer.cli settings --markdown

clean:
	rm -rf $(VENV) weights/build run
