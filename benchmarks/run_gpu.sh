#!/usr/bin/env bash
# Benchmarks on a GPU. TABLES (default "accelerator") picks what runs:
#   accelerator  the accelerator table (issue 13 §3, accelerator_table.py), in two runs so a short lease keeps
#                the part that matters most: first resnet50 -> resnet18 at 224x224 (bf16, 128 per chip) with
#                PyTorch eager and torch.compile rows where python has a CUDA torch (TORCH_PYTHON overrides),
#                then the CIFAR pairs at batch 64/256/1024 (PyTorch eager rows only); written to $OUT (or
#                benchmarks/results) as accel_<device>_imagenet.{json,md} and accel_<device>_cifar.{json,md}.
#                ACCEL_ARGS adds arguments to both runs (e.g. "--no-max-batch" or "--steps 20").
#   step         the issue-3 step-throughput table: float32 and bfloat16, live-teacher, cached-teacher and
#                student-only rows at batch 64, as gpu_float32.json / gpu_bfloat16.json.
# Run from the repository root:  bash benchmarks/run_gpu.sh      (or TABLES="accelerator step" ...)
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

TABLES=${TABLES:-accelerator}
if [[ " $TABLES " == *" accelerator "* ]]; then
  DEVICE=$("$PY" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
  TORCH_PY=${TORCH_PYTHON:-}
  if [[ -z "$TORCH_PY" ]] && "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    TORCH_PY="$PY"
  fi
  TORCH_ARGS=()
  [[ -n "$TORCH_PY" ]] && TORCH_ARGS=(--torch-python "$TORCH_PY")
  # shellcheck disable=SC2086  # ACCEL_ARGS is a list of arguments
  timeout "${ACCEL_TIMEOUT:-420}" "$PY" benchmarks/accelerator_table.py --cifar-pairs "" ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"} \
    --out "$DEST/accel_${DEVICE}_imagenet.json" ${ACCEL_ARGS:-} || echo "the ImageNet-shaped table did not finish (exit $?)"
  # shellcheck disable=SC2086
  timeout "${ACCEL_TIMEOUT:-420}" "$PY" benchmarks/accelerator_table.py --imagenet-pairs "" ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"} \
    --torch-variants eager --out "$DEST/accel_${DEVICE}_cifar.json" ${ACCEL_ARGS:-} \
    || echo "the CIFAR table did not finish (exit $?)"
fi
if [[ " $TABLES " == *" step "* ]]; then
  COMMON=(--methods kd,fitnets,at,fsp --pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2 --batch 64
          --steps ${STEPS:-40} --round-steps 10 --sync-every 10 --cached-teacher --student-only)
  for DTYPE in float32 bfloat16; do
    timeout "${TABLE_TIMEOUT:-240}" "$PY" benchmarks/step_throughput.py "${COMMON[@]}" --dtype "$DTYPE" \
      --out "$DEST/gpu_${DTYPE}.json" || echo "the $DTYPE table did not finish (exit $?)"
  done
fi
