# The README's commands. Each target installs what it needs, so a fresh clone works.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is installed only when missing; override for another build, e.g. TORCH_SPEC="torch --index-url ...".
TORCH_SPEC ?= torch==2.13.0
PYTEST := $(PYTHON) -m pytest

.PHONY: install install-test demo test test-fast bench check-cuda info clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=64" wheel
	# --no-build-isolation: build against the installed torch (an isolated build would download one)
	# and compile the C++ extension ahead of time.
	$(PIP) install -q --no-build-isolation -e ".[experiments]"

install-test: install
	$(PIP) install -q --no-build-isolation -e ".[test,triton,experiments]"

demo: install
	$(PYTHON) -m sparse_sam.experiments.reproduce --preset quick --data embedded --out results/quick

test: install-test
	# Every available backend's ops against the reference on every present device; non-zero on a FAIL.
	$(PYTHON) -m sparse_sam.info --selftest
	@if [ -x scripts/check_cuda_sources.sh ]; then PYTHON=$(PYTHON) scripts/check_cuda_sources.sh; fi
	$(PYTEST) tests -q
	# Benchmarks run once each at small sizes so they cannot rot; timings are `make bench`'s job.
	SPARSE_SAM_BENCH_SMALL=1 $(PYTEST) benchmarks -q --benchmark-disable

bench: install-test
	$(PYTEST) benchmarks --benchmark-only

info:
	$(PYTHON) -m sparse_sam.info

clean:
	rm -rf build *.egg-info sparse_sam/*.so .pytest_cache .benchmarks
