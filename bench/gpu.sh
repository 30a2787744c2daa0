#!/usr/bin/env bash
# bench/gpu.py on a GPU machine without network whose Python has torch, transformers, peft, numba and
# pyarrow: wheels of what it may lack (polars, zarr and its codecs, gguf; README "Measuring on a GPU")
# are installed from $TCA_WHEELS (default ./wheels) into ./.gpu-deps, then the bench runs from this
# checkout with an 8-minute limit. Arguments go to bench/gpu.py, e.g.  bench/gpu.sh --out results/gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${TCA_WHEELS:-wheels}
deps=$PWD/.gpu-deps
if compgen -G "$wheels/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target "$deps" "$wheels"/*.whl
fi
export PYTHONPATH=$PWD:$deps${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python bench/gpu.py "$@"
