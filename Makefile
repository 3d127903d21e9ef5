# var-moe: every set-up step lives here so a fresh machine needs exactly one command per job.
#   make serve   - install, then serve the reference model with VAR (5% shadow-verified) on 127.0.0.1:8000
#   make test    - install (incl. Debian's prometheus for the scrape tests), then run the whole suite
# Other targets: demo, ab-test, reliability, bench-*, gpu-check (see README and docs/BENCHMARKS.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup prometheus test serve demo ab-test reliability bench-reference bench-capture bench-router bench-server bench-offload gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# constraints.txt pins the CPU build of torch on this machine; the package's own ranges stay open
	$(BIN)/pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

test: setup prometheus
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# --shadow-rate: 5% of table/cache decisions are re-checked by the learned router (verification metrics)
serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe serve --shadow-rate 0.05

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe info

# Phase 2 under traffic: the server with VAR, Locust A/B load, report under results/ab_test/
ab-test: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe ab-test --duration 120 --users 8 --output-dir results/ab_test \
	  --server-args "--shadow-rate 0.05"

# fuzz, overload, faults and soak against a real server; prints counts, writes runs/reliability/
reliability: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m analysis_jobs.reliability --duration 120

bench-reference: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/reference_throughput.py --repeats 7

bench-capture: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/capture_overhead.py --batches 8 --repeats 7

bench-router: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/router_share.py

bench-server: setup
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/server_throughput.py --run-time 20 --repeats 3 --out benchmarks/results/server_throughput.json

# The CUDA-only paths (bf16 routing and capture, bitsandbytes 4/8-bit, device_map=auto, the server on
# CUDA) on the reference model: one table + runs/gpu_check.json. Without CUDA it says so and exits 0.
gpu-check: setup
	@if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(BIN)/pip install -q -c constraints.txt -e ".[gpu]"; fi
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py --out runs/gpu_check.json
# expert-offloading simulator speed on the committed test trace (docs/OFFLOAD.md)
bench-offload: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.offload_simulator --output benchmarks/results/offload_simulator.json

clean:
	rm -rf $(VENV) .pytest_cache
