# Two commands do all the set-up: `make demo` (the default sweep) and `make test` (the default test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdbench

# The tests run torch on one thread each (tests/conftest.py), so one pytest worker per core (pytest-xdist).
WORKERS ?= auto

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n $(WORKERS)

clean:
	rm -rf $(VENV) outputs multirun runs
