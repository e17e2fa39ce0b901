# Two entry points (see README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU install path: keep pip on torch 2.13 (the local CPU build) instead of a CUDA build.
CPU_PIN := PIP_CONSTRAINT=$(CURDIR)/constraints-cpu.txt
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(CPU_PIN) $(BIN)/pip install --quiet "torch==2.13.*"
	$(CPU_PIN) $(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/immunize-cli world quality --samples 64 --json runs/demo/quality.json --grid runs/demo/quality.png
	$(BIN)/immunize-cli world sample --prompt "a red circle in striped style" \
		--prompt "a blue cross in checkered style" --prompt "a yellow triangle in zigzag style" \
		--n 8 --out runs/demo/samples.png

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not e2e"

clean:
	rm -rf runs .pytest_cache
