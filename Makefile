# var-moe: every set-up step lives here so a fresh machine needs exactly one command per job.
#   make serve   - install, then serve the reference model with VAR on 127.0.0.1:8000
#   make test    - install (incl. Debian's prometheus for the scrape tests), then run the whole suite
# Other targets: demo, bench-*, reliability, ab-test (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup prometheus test serve demo clean

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

serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe serve

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/varmoe info

clean:
	rm -rf $(VENV) .pytest_cache
