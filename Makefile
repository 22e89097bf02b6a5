# Quick start targets (see README): `make demo` and `make test` each create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build (a bare `torch` requirement can pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serve,train,openvino]'
	touch $@

demo: $(STAMP)
	$(BIN)/taiyi generate "小桥流水人家，水墨画" --seed 42 --output demo.png --overwrite
	$(BIN)/taiyi info demo.png

test: $(STAMP)
	# OpenVINO's tests run in their own process: with its runtime loaded, a later test of the same
	# process (the tiny recipe run) crashed with SIGSEGV — under investigation, see README "Not yet".
	$(BIN)/python -m pytest -q --ignore=tests/test_backends.py --ignore=tests/test_backends_walkthrough.py \
		--deselect tests/test_cache_cli.py::test_openvino_conversion_records_versions_model_and_last_use
	$(BIN)/python -m pytest -q tests/test_backends.py tests/test_backends_walkthrough.py \
		tests/test_cache_cli.py::test_openvino_conversion_records_versions_model_and_last_use

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) .cache demo.png outputs
