# prunelab: `make demo` and `make test` install everything first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint bench clean

# The registry has no CPU build of torchvision: the regular (CUDA) torch/torchvision wheels install and run
# on CPU; constraints.txt keeps the pair consistent. Re-runs only when pyproject/constraints change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prunelab experiment=demo

test: $(STAMP)         # the whole suite (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 -n 2 --dist worksteal tests

test-fast: $(STAMP)    # unit and property tests only (no end-to-end pipelines, CLI subprocesses, DDP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 -n 2 --dist worksteal -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check prunelab tests scripts

bench: $(STAMP)
	$(PY) scripts/bench_masked_step.py
	$(PY) scripts/bench_pretrain_epoch.py --batch 128
	$(PY) scripts/bench_pretrain_epoch.py --batch 512
	$(PY) scripts/connectivity_at_init.py --seeds 2
	$(PY) scripts/bench_effective.py
	$(PY) scripts/bench_structured.py --models vgg19 resnet18 resnet50 --repeats 5
	$(PY) scripts/bench_overparam.py --batch-size 16 --repeats 3
	$(PY) scripts/bench_dllp.py
	$(PY) scripts/bench_bmrs_step.py
	$(PY) scripts/bench_sweep.py --sweep-repeats 3
	$(PY) scripts/bench_gpu.py

clean:
	rm -rf outputs .pytest_cache
