# One command each (see README):  make demo   |   make test
# Creates .venv, installs pinned dependencies (torch first: an unpinned torch pulls a
# multi-GB CUDA build), builds the C++ plugin against that torch/openmm, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.requirements-installed

.PHONY: setup build test test-cpp demo benchmark clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt torch==2.13.0
	touch $(STAMP)

build: setup
	$(PIP) install --quiet --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q

test-cpp: build
	build/cmake/tests/TestCGMLIntegrator

demo: build
	$(VENV)/bin/cgml demo

benchmark: build
	$(PY) benchmarks/integrator_overhead.py

clean:
	rm -rf build openmm_cgml/*.so *.egg-info
