# deepserve — the two commands a new machine needs:
#   make run    set up .venv and serve the bundled model on http://127.0.0.1:8000/v1
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepserve-installed
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
ARGS ?=

.PHONY: run test setup bench clean

setup: $(STAMP)

# llama-cpp-python is compiled from source with the ISA flags this CPU reports and AMX off
# (scripts/cmake_args.sh says why); pip caches the wheel, so later set-ups take seconds.
$(STAMP): pyproject.toml constraints.txt scripts/cmake_args.sh
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "deepserve needs Python 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	CMAKE_ARGS="$$(scripts/cmake_args.sh)" $(BIN)/pip install --quiet -c constraints.txt "$(LLAMA_CPP_PYTHON)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m deepserve selfcheck
	touch $@

run: $(STAMP)
	$(BIN)/deepserve serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,bench]"
	test -x benchmarks/peers/llama-server || benchmarks/build_llama_server.sh
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:
	rm -rf $(VENV)
