# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check test-oldest test-llamafactory

demo: $(VENV)/.installed
	$(VENV)/bin/guardian demo

test: $(VENV)/.installed
	$(PY) -m mypy guardian callbacks
	$(PY) -m ruff check guardian callbacks rules tests benchmarks
	$(PY) -m pytest -q

# Static checks: the type checker over the package, the linter over everything.
check: $(VENV)/.installed
	$(PY) -m mypy guardian callbacks
	$(PY) -m ruff check guardian callbacks rules tests benchmarks

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# LLaMA-Factory end to end (tests/callbacks/test_llamafactory.py): the real `llamafactory-cli train` under `guardian run`
# and `guardian attach`. Its own venv: llamafactory 0.9.5 caps transformers at 5.6 (and trl, peft, accelerate).
LF_VENV := .venv-llamafactory

test-llamafactory: $(LF_VENV)/.installed
	$(LF_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/callbacks/test_llamafactory.py

$(LF_VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(LF_VENV)
	$(LF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LF_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]' llamafactory==0.9.5
	# The torchvision and torchaudio it pulls in are built for another torch and fail at import beside the CPU
	# torch 2.13.0; text training needs neither (tests/stubs/torchaudio stands in for LLaMA-Factory's import).
	$(LF_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio
	touch $@

# The training-side tests on the oldest stack the package admits (constraints-oldest.txt), in .venv-oldest.
# TRL is not installed there (its releases need a newer transformers): tests that need it skip.
OLDEST := .venv-oldest
OLDEST_TESTS := tests/callbacks/test_stacks.py tests/callbacks/test_callback.py tests/callbacks/test_recovery.py

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
	rm -rf $(OLDEST)
	python3 -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet -c constraints-oldest.txt -e '.[train]' pytest
	touch $@
