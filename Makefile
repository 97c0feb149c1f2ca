# First use of `make run` or `make test` creates .venv and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench lint format clean

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	@# Build-backend notices (editable install) say nothing to act on.
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install -qq -e ".[dev,data,crf]"
	touch $(STAMP)

# The main job: built-in real data -> Ray Train (2 workers) -> MLflow registry -> overlay image.
run: $(STAMP)
	$(BIN)/segplatform quickstart --workdir .

# The benchmark suite P1-P8 (BENCHMARKS.md): each comparison measured side by side in one run.
bench: $(STAMP)
	$(BIN)/segplatform bench --out outputs/bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
