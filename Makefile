# Benchmarks (long; not part of CI). `./run bench` calls `make -s bench`.
#
#   make bench                      every bench/*.py script (bench/common.py is a library)
#   make bench-fs                   bench/fs_throughput.py (issue 2)
#   make bench-fs BENCH_ARGS=--quick    any script flags go in BENCH_ARGS
#
# Results for docs/BENCHMARKS.md: see the command at the top of each of its sections.

PYTHON ?= .venv/bin/python
BENCH_SCRIPTS := $(sort $(filter-out bench/common.py,$(wildcard bench/*.py)))
BENCH_ARGS ?=

.PHONY: bench bench-fs

# Runs every script even if one fails; fails at the end, naming the ones that failed.
bench:
	@failed=""; for script in $(BENCH_SCRIPTS); do \
	  echo "==> $$script"; \
	  $(PYTHON) $$script || failed="$$failed $$script"; \
	  echo; \
	done; \
	if [ -n "$$failed" ]; then echo "bench: failed:$$failed" >&2; exit 1; fi

bench-fs:
	$(PYTHON) bench/fs_throughput.py $(BENCH_ARGS)
