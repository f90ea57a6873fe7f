# Everyday targets. `make demo` and `make test` each set up everything they need first.
PYTHON ?= python3

.PHONY: setup demo demo-dpo test test-fast quality format bench

setup:  ## install torch (CPU build on these machines) and pg_tune with its dev tools
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: setup  ## the embedded default: LoRA on a tiny PaliGemma 2, synthetic shapes, no downloads
	$(PYTHON) -m pg_tune train recipes/demo/shapes_tiny.yaml --overwrite

demo-dpo: demo  ## DPO after the demo: prefer the right colour/shape caption (README "Preference tuning")
	rm -rf runs/demo-shapes-merged
	$(PYTHON) -m pg_tune export runs/demo-shapes --out runs/demo-shapes-merged --dtype fp32
	$(PYTHON) -m pg_tune train recipes/demo/shapes_dpo.yaml --overwrite

# The suite runs in TEST_WORKERS processes (pytest-xdist; one file stays on one worker, so a
# module's shared runs are built once), each torch at one thread. On a 2-core machine three workers
# beat two: a worker waiting on a child process, a server or a browser leaves a core idle, and a
# third fills it (whole suite 1,041 and 1,073 s against 1,178 s with two, back to back on one
# machine, ~1.95 cores busy). Files go out slowest first (tests/conftest.py's SLOWEST_FILES;
# --no-loadscope-reorder keeps that order).
TEST_WORKERS ?= 3

test: setup  ## the whole suite, slow end-to-end tests included (what CI runs)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -m "" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: ## the fast tier only (a plain `pytest` does the same)
	$(PYTHON) -m pytest -q

quality:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .
