# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wsss-installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export AWS_REQUEST_CHECKSUM_CALCULATION ?= when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION ?= when_required
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv test test-fast demo demo-quick bench clean-stack

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import torch, torchvision, ray, pydensecrf.densecrf, s3fs, moto, pyarrow"
	@touch $(STAMP)

venv: $(STAMP)

# pytest exits 5 when it collected no test: that must fail, not pass silently.
test: venv
	@$(PY) -m pytest tests -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: venv
	@$(PY) -m pytest tests -q -p no:cacheprovider -m "not ray"; rc=$$?; [ $$rc -eq 5 ] && exit 1; exit $$rc

demo: venv
	$(PY) -m jobs.demo

demo-quick: venv
	$(PY) -m jobs.demo --quick

BENCH_WORK ?= /tmp/wsss-bench-make
bench: venv
	$(PY) -m bench.bench_cam_methods --work $(BENCH_WORK)
	$(PY) -m bench.bench_pcm --work $(BENCH_WORK)
	$(PY) -m bench.bench_refine_quality --work $(BENCH_WORK) --methods cam,seam,daen-csm
	$(PY) -m bench.bench_rw_sweep --cam $(BENCH_WORK)/seam-0 --affinity $(BENCH_WORK)/seam-0-affinity \
	    --data $(BENCH_WORK)/synth --alpha 0.5,1,2,3,6
	$(PY) -m bench.bench_random_walk
	$(PY) -m bench.bench_crf
	$(PY) -m bench.bench_train_overhead
	$(PY) -m bench.bench_pipeline

clean-stack: venv
	$(PY) -m infra.stack down
