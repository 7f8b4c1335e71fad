# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check test-oldest

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

# The training-side tests on the oldest stack the package admits (constraints-oldest.txt), in .venv-oldest.
# TRL is not installed there (its releases need a newer transformers): tests that need it skip.
OLDEST := .venv-oldest
OLDEST_TESTS := tests/test_stacks.py tests/test_callback.py tests/test_recovery.py

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
	rm -rf $(OLDEST)
	python3 -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet -c constraints-oldest.txt -e '.[train]' pytest
	touch $@
