# Set-up and everyday commands. `make repro` and `make test` bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: the CPU wheel on this machine's disk; a bare `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Stage commands in dvc.yaml call `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: dashboard repro test test-fast lint params dvc-yaml bench system-deps export-c compare vega-js

# The venv is current when it was installed for this content of pyproject.toml and this torch: the stamp
# holds that key, so a fresh checkout or a `touch` (newer, same content) does not reinstall.
VENV_KEY := $(shell sha256sum pyproject.toml | cut -c1-16) $(TORCH_SPEC)
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(VENV_KEY))
.PHONY: $(STAMP)
endif

# pip byte-compiles one file after another; compileall spreads the ~19,000 files over the cores instead
# (the venv in 177 s instead of 202 s on 2 cores). Its exit status is ignored as pip ignores the same failure:
# torch ships a Python 3.12-only file that does not compile on 3.11. The import check after it is the test.
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet --no-compile "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" ; test -x $(BIN)/python
	$(BIN)/pip install --quiet --no-compile -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	$(BIN)/python -c "import bnn_core, pipeline, dvc, mlflow, lightning"
	echo '$(VENV_KEY)' > $(STAMP)

repro: $(STAMP) vega-js
	$(BIN)/dvc repro
	@$(BIN)/python -m pipeline.summary

# The three set-up steps are independent (pip, apt-get, npm registry): they run side by side. The test files
# are spread over the cores, one file per worker at a time (its module-scoped fixtures are built once).
test:
	$(MAKE) --no-print-directory --jobs=3 $(STAMP) system-deps vega-js
	$(BIN)/ruff check .
	$(BIN)/pytest --numprocesses=auto --dist=loadfile --durations=15

# Debian tools the C export's tests build and run with (ARM cross-compilers, qemu-arm), and chromium for the
# plots page test: installs what is missing when run as root with apt-get, otherwise says why not (those
# tests then skip, naming the tool).
system-deps:
	bash scripts/system_deps.sh

# The scripts that `dvc plots show` pages load (vega, vega-lite, vega-embed), from the npm registry, pinned and
# integrity-checked, into vendor/ (git-ignored): the page (.dvc/plots_page.html) then draws offline. Offline,
# this says so and the page loads them from the CDN; standard library only, so no venv and no npm.
vega-js:
	@$(PYTHON) scripts/fetch_vega.py

# The trained model as a C99 library (dist/c, a DVC output) and its host build (build/bnn_predict:
# outside dist/c, so that `dvc status` stays clean).
export-c: $(STAMP)
	$(BIN)/dvc repro export
	mkdir -p build && $(CC) -O2 -std=c99 -o build/bnn_predict dist/c/main.c dist/c/bnn_model.c

# The inner loop: everything but the tests marked slow (real stages, subprocesses, servers); under 90 s.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Inference speed: float32 (torch / numpy BLAS) vs packed bits vs the fast kernel; writes reports/bench.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_inference.py

# Rewrite params.yaml from conf/ exactly as DVC's Hydra composition does (`dvc exp run` does it too).
params: $(STAMP)
	$(BIN)/python -c "from pathlib import Path; from dvc.utils.hydra import compose_and_dump; \
	compose_and_dump(Path('params.yaml'), str(Path('conf').resolve()), None, 'config', '.', [])"

# Rewrite dvc.yaml from the stage table in pipeline/stages.py (code deps = each stage's import closure).
dvc-yaml: $(STAMP)
	$(BIN)/python -m pipeline.stages

# MLflow UI on the project's store, local only.
MLFLOW_PORT ?= 5000
dashboard: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlruns \
	  --host 127.0.0.1 --port $(MLFLOW_PORT)

# The workspace, HEAD and its DVC experiments in one 120-column table, accuracy first
# (`make compare ARGS=-A`: any `dvc exp show` option, here every commit).
compare: $(STAMP)
	@$(BIN)/python -m pipeline.compare $(ARGS)
