# Two entry points (see README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU install path: keep pip on torch 2.13 (the local CPU build) instead of a CUDA build.
CPU_PIN := PIP_CONSTRAINT=$(CURDIR)/constraints-cpu.txt
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: setup browser demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(CPU_PIN) $(BIN)/pip install --quiet "torch==2.13.*"
	$(CPU_PIN) $(BIN)/pip install --quiet -e ".[dev]"
	# DeepSpeed JIT-compiles its CPU comm op on first use (30-70 s per process on a cold cache): do it once here
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; b = g().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	touch $@

# headless Chromium opens the HTML report in the tests (Debian package; root installs it)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: setup
	scripts/demo.sh

# two pytest workers, one test file each at a time (a file's module fixtures stay in one worker): most tests keep
# one core busy, so the 2-core suite takes about half the time of one worker
test: setup browser
	$(BIN)/pytest -q -n 2 --dist loadfile

test-fast: setup
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not e2e"

clean:
	rm -rf runs .pytest_cache
