# Two commands do all the set-up on a fresh machine (no GPU, no Hub access):
#   make repro       build .venv if needed, then run the whole DVC pipeline (embedded default)
#   make test        build .venv if needed, then run the whole test suite (CI runs this)
#   make test-fast   the same without the slow, browser and e2e tests: a minute or two, no sudo
#   (both run `ruff check` and `ruff format --check` first: the rules are pyproject.toml's [tool.ruff])
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install browser repro test test-fast bench fullsize ui serve figures clean

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

repro: $(STAMP)
	@git rev-parse HEAD >/dev/null 2>&1 || { echo "error: dvc needs a git repo with one commit"; exit 1; }
	dvc repro

# Debian's Chromium and its WebDriver, for the browser tests (tests/test_serve_page.py): a
# browser that a tool downloads itself cannot be fetched offline. apt-get only when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file in one of them; the
# tests use one torch thread each (tests/conftest.py), so 2 fills this machine's 2 cores.
# `make test`: every test, 33 min on an AMD EPYC's 2 cores (363 tests), 13 min 43 s on an Intel Xeon's (340 tests; 3 workers did not help, the
# CPU is the limit). `make test-fast`: without the tests marked (pyproject.toml) slow (over ~10 s
# each), browser (Chromium, so no `make browser`: no apt, no sudo) or e2e (`dvc repro` on copies
# of the project: 40 % of the suite's time); 2 min 16 s on the AMD EPYC (281 tests), 86 s on the Xeon (195).
TEST_WORKERS ?= 2
PYTEST := python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
# The linter and the formatter's check first: a second, and a finding stops the run before the suite's minutes.
test: $(STAMP) browser
	ruff check .
	ruff format --check .
	$(PYTEST)

test-fast: $(STAMP)
	ruff check .
	ruff format --check .
	$(PYTEST) -m "not slow and not browser and not e2e"

# Every bench/bench_*.py in turn, on any machine: one with nothing to measure here prints one line
# "skipped: ..." and exits 0 (bench_gpu_train.py without CUDA; bench_spread.py without `make
# repro`'s data/extracted/ and models/). docs/testing.md has the figures and how long it takes.
bench: $(STAMP)
	for b in bench/bench_*.py; do python $$b || exit 1; done

# Kandinsky 2.1 at its published size (random weights) through every real stage, on a few
# dozen rows: writes reports/fullsize.json (docs/gpu.md, "Full-size dry run"). Not part of `make test`.
# GPU benchmark: make fullsize FULLSIZE_ARGS="--device cuda --batch-size 32 --bf16"
FULLSIZE_ARGS ?=
fullsize: $(STAMP)
	python bench/fullsize.py $(FULLSIZE_ARGS)

# The MLflow UI on mlflow.db; prints the address of the pipeline runs, ready to compare (README "Experiments").
ui: $(STAMP)
	fashiondiff ui

# The pictures of the README and docs/ (reports/figures/*.png) from the current models/ and mlflow.db: after
# `make repro` and two experiments (README "Experiments"). Not part of `make repro`.
figures: $(STAMP) browser
	python tools/readme_figures.py

# The web page over the tuned (models/) and base models: http://127.0.0.1:7860 (docs/web-page.md).
serve: $(STAMP)
	fashiondiff serve

clean:
	rm -rf build data models checkpoints reports/metrics.json reports/scores.json reports/evaluation.json reports/plots reports/samples reports/standin
