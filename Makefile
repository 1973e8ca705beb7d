# Set-up and entry points. `make train` and `make test` work on a fresh machine: they create
# .venv, install the pinned requirements, and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: train test test-fast lint mlflow serve gpu-check install install-dev clean-sample

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project itself is installed editable, so Ray's worker processes import `pipeline` from
# wherever a job is started.
$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt $(STAMP)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

# Trains on the bundled sample (generated and prepared on first use) with a local Ray and MLflow.
train: $(STAMP)
	$(BIN)/python jobs/train.py $(ARGS)

# The team's MLflow server on 127.0.0.1:5000 (sqlite + proxied artifacts in ./mlflow-server/).
mlflow: $(STAMP)
	$(BIN)/python jobs/mlflow_server.py $(ARGS)

# The champion online on 127.0.0.1:8000 (POST /predict, GET /healthz), following @champion as it moves.
serve: $(STAMP)
	$(BIN)/python jobs/serve.py --model models:/alexnet@champion $(ARGS)

# The whole suite: what CI runs.
test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every test that needs no trained AlexNet and no Ray cluster of its own: the loop while working.
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Every CUDA path checked and measured on this machine's GPU, in minutes (benchmarks/gpu_check.py);
# without a GPU it says so. It needs torch, torchvision, numpy, pillow and pyarrow, not Ray or MLflow:
# the venv's Python where there is one, else the machine's own (a bare PyTorch image, offline).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu_check.py $(ARGS)

# Lint and formatting, checked (`ruff check --fix .` and `ruff format .` fix most of it).
lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-sample:
	rm -rf data/sample
