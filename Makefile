# Two entry points on a fresh machine: `make train` (the main job) and `make test` (the test suite).
# Both create the virtual environment .venv and install the project into it first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test train bench-cpu

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-build-isolation -e '.[train,test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

train: install
	$(VENV)/bin/metrix-train --overwrite
