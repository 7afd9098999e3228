# The two commands a new user runs. Each creates .venv when missing and installs what it needs;
# a stamp per dependency set means a second run installs nothing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and exactly: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEPS_HASH := $(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: train test install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-$(DEPS_HASH): | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test-$(DEPS_HASH): $(VENV)/.installed-$(DEPS_HASH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed-$(DEPS_HASH)
install-test: $(VENV)/.installed-test-$(DEPS_HASH)

train: install
	$(PY) -m plait train configs/default.yaml $(ARGS)

test: install-test
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf runs data/cache
