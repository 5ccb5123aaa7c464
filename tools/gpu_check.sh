#!/usr/bin/env bash
# The GPU checks, as one run on an NVIDIA machine (the device tool): the compiled kernels
# against the references, the attention benchmark, and the quickstart trained on the GPU.
# Packages the machine lacks travel as wheels in .whl/ (see /work/.library/device/README.md).
# Writes its logs to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
nvidia-smi -L
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
export LLMJAX_TEST_XLA_O1=0 LLMJAX_TEST_JAX_CACHE=0  # the test conftest's CPU-only settings off
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_flash_attention_gpu.py \
  2>&1 | tee "$OUT/pytest.log" | tail -30
timeout 120 python3 benchmarks/attention.py --seq 2048 8192 2>&1 | tee "$OUT/attention.jsonl" | tail -20
began=$(date +%s)
timeout 240 python3 -m llmjax.main --config=experiments/quickstart.py --workdir=/tmp/qs_gpu \
  --config.model.attention=auto 2>&1 | grep -v "sample:" | tail -12
echo "quickstart wall: $(( $(date +%s) - began )) s"
cp /tmp/qs_gpu/metrics.jsonl "$OUT/quickstart_metrics.jsonl" 2>/dev/null || true
