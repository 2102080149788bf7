#!/usr/bin/env bash
# One command for a lent GPU or TPU (under 8 minutes on one H100/H200), from the repository root, offline:
# the Pallas decode kernel (over float, fp8 and int8 caches) compiled and checked against the portable path,
# the model's decode through it, then the 9B-shape benchmark (bf16 and FP8, batch 1 and 16, 128 and 8k tokens
# filled, 2k prefill MFU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
python -c "import jax; print(jax.__version__, jax.devices())"
python -m pytest -q -p no:cacheprovider tests/test_pallas_decode.py tests/test_blockwise.py
python benchmarks/attention.py --parts gpu,step,memory
