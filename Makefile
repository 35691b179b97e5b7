# `make demo` and `make test` work on a fresh machine: each creates .venv and installs when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flexar-installed

.PHONY: install test demo clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -n 2 --dist loadfile --durations=25

demo: install
	$(PY) scripts/demo.py --output runs/demo

clean:
	rm -rf runs lightning_logs .pytest_cache
