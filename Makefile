# Both targets set up .venv on first use: torch==2.13.0 first (the CPU build that lies on disk;
# an unpinned torch would pull a multi-GB CUDA build), then this project with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean

demo: $(VENV)/.installed
	$(PY) -m fp8_compile.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
