# hmoe: two commands matter on a fresh machine: `make run` and `make test`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
PRESET     ?= quick

.PHONY: setup run test bench reliability clean apt-data

setup: $(VENV)/.installed

# torch first (the pinned spec takes the local CPU wheel; an unpinned torch pulls a CUDA build),
# then the project with its dev extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Optional Debian dictionaries for the knowledge corpus (skipped with a warning when absent).
apt-data:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  dpkg -s dict-gcide wordnet-base dict-foldoc >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dict-gcide wordnet-base dict-foldoc >/dev/null) || \
	  echo "warning: could not install dict-gcide/wordnet-base/dict-foldoc; knowledge corpus will skip them"; \
	fi

run: setup apt-data
	$(BIN)/hmoe up --preset $(PRESET)

test: setup apt-data
	$(BIN)/python -m pytest -q tests
	BIN=$(abspath $(BIN)) bash tests/e2e_ray_job.sh

bench: setup
	$(BIN)/python -m bench.run_all

reliability: setup
	$(BIN)/python -m pytest -q -m reliability tests

clean:
	rm -rf runs .hmoe bench/results
