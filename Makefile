# The two commands of the README. Each sets itself up on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On these machines a CPU build of torch 2.13.0 is cached; pin it so pip does not pull CUDA wheels.
TORCH ?= torch==2.13.0
OUT ?= bench-out
BENCH_ARGS ?=
# pytest-xdist workers (the interpreter tests of the Triton kernels are CPU-bound: 2 workers on the 2-core CI
# machine ran the suite in 11:52 against 17:44 in one process, 2026-12-06). --dist worksteal: an idle worker takes
# tests queued for the other, so the long interpreter tests do not pile up at the end of one worker's queue (on this
# 2-core machine the suite ran 896 s with the default distribution, 614 s with worksteal, eighteenth session)
TEST_WORKERS ?= auto

.PHONY: bench test test-full setup clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[bench,test]"
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/attnzoo bench --out $(OUT) $(BENCH_ARGS)

test: $(STAMP)
	$(VPY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --durations=20

# every case, the `full`-marked further combinations of options too (tests/conftest.py; about twice the time)
test-full: $(STAMP)
	ATTNZOO_TESTS=full $(VPY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --durations=20

clean:
	rm -rf $(VENV) $(OUT)
