# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check

demo: $(VENV)/.installed
	$(VENV)/bin/guardian demo

test: $(VENV)/.installed
	$(PY) -m mypy guardian callbacks
	$(PY) -m pytest -q

# Static checks: the type checker over the package.
check: $(VENV)/.installed
	$(PY) -m mypy guardian callbacks

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@
