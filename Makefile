# Everything a fresh machine needs: `make demo` and `make test` create the
# virtual environment, install the requirements and the package (compiling
# its extension through setup.py), then run. Later runs skip the set-up until
# one of its inputs changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ramda-installed
# Inputs of the installed state: requirements, the build description and the
# extension sources (an editable install compiles csrc/ in place).
SETUP_INPUTS := requirements.txt setup.py $(wildcard tools/build_extension.py) \
                $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --use-pep517: the pip that python3 -m venv bundles (23.x) would otherwise run
# `setup.py develop`, which recent setuptools hands to an isolated build that
# cannot see torch, silently skipping the extension.
$(STAMP): $(BIN)/python $(SETUP_INPUTS)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-build-isolation --use-pep517 -e .
	touch $@

demo: $(STAMP)
	$(BIN)/ramda-kernels train

# Triton kernels run on the CPU under its interpreter, so the suite covers them
# on machines without a GPU. The native test of the shared math header
# (csrc/tests, built by CMake without torch) runs first: it takes seconds.
test: export TRITON_INTERPRET = 1
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" RAMDA_TESTS_ONLY=1 cmake -S . -B build/native-tests -G Ninja > /dev/null
	PATH="$(CURDIR)/$(BIN):$$PATH" cmake --build build/native-tests
	ctest --test-dir build/native-tests --output-on-failure
	$(BIN)/python -m pytest -q tests
