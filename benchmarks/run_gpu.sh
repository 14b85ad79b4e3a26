#!/usr/bin/env bash
# Step-throughput table on a GPU (issue 3): float32 and bfloat16; live-teacher, cached-teacher and
# student-only rows; written to $OUT (or benchmarks/results) as gpu_float32.json / gpu_bfloat16.json.
# Run from the repository root:  bash benchmarks/run_gpu.sh
#
# It uses the machine's own python3 when that already has a CUDA jax, flax, optax and orbax (as the
# lent H200 image does, offline); ml_collections is installed from a carried wheel in .whl/ if present.
# Elsewhere it makes a venv with jax[cuda12] (needs network).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
if ! "$PY" -c "import jax, flax, optax, orbax.checkpoint; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null; then
  VENV=${VENV:-/tmp/kdjax-gpu-venv}
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q "jax[cuda12]" && "$VENV/bin/pip" install -q -e .
  PY="$VENV/bin/python"
fi
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  else
    "$PY" -m pip install -q ml_collections
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv || true

# A 1-config smoke run first, so an API problem costs seconds, not the whole lease.
"$PY" benchmarks/step_throughput.py --methods kd --pairs wrn_40_2:wrn_16_2 --batch 64 --steps 5 --out /tmp/smoke.json

COMMON=(--methods kd,fitnets,at,fsp --pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2 --batch 64
        --steps ${STEPS:-40} --round-steps 10 --sync-every 10 --cached-teacher --student-only)
for DTYPE in float32 bfloat16; do
  timeout "${TABLE_TIMEOUT:-240}" "$PY" benchmarks/step_throughput.py "${COMMON[@]}" --dtype "$DTYPE" \
    --out "$DEST/gpu_${DTYPE}.json" || echo "the $DTYPE table did not finish (exit $?)"
done
