VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ptqd demo --out demo_out

test: setup
	$(PY) -m pytest -q
