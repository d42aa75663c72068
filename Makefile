# Every target installs what it needs into .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; on a GPU machine: make demo TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fudlr-installed

.PHONY: install demo test test-fast lint bench bench-quick bench-engine bench-lds reference reference-metrics clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the same without the tests marked slow (tests/README.md)
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

# FUDLR against the baselines on SmolLM2 + MovieLens-100K (bench/README.md); full: hours on 2 CPU cores;
# in two sittings: BENCH_ARGS="--no-scaling --no-service", then BENCH_ARGS="--systems-from FILE"
bench: $(STAMP)
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m bench.compare --quick

# training recipes, influence throughput and job cost (bench/engine.py); full: ~45 min on 2 CPU cores
bench-engine: $(STAMP)
	$(BIN)/python -m bench.engine

# fidelity as the field scores it: LDS of the influence scores on the tiny model (bench/lds.py);
# 256 retrainings, about half an hour on 2 shared CPU cores; LDS_ARGS=--quick for a smoke run
bench-lds: $(STAMP)
	$(BIN)/python -m bench.lds $(LDS_ARGS)

# the reference recommender (reference/): retrain it from its recipe (seeded; about an hour on
# 2 CPU cores with native bf16), or measure the committed adapter against most-popular
reference: $(STAMP)
	$(BIN)/python -m bench.reference train

reference-metrics: $(STAMP)
	$(BIN)/python -m bench.reference evaluate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .fudlr-demo .fudlr-bench .fudlr-reference .pytest_cache .ruff_cache
