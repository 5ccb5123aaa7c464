"""XLA:CPU matmul throughput by operand layout and dtype: why `llmjax.models.layers.matmul`
runs the backward matmuls of 16-bit projections on materialized transposes.

    python benchmarks/matmul_layouts.py

For x [M, K], w [K, N], g [M, N] (M, K, N = 2048, 512, 1536) and the weight gradient's shape
[512, 2048] x [2048, 1536], prints GFLOP/s of: the forward x @ w; the backward's dx = g @ w.T
and dw = x.T @ g as autodiff writes them (a dot_general over a transposed operand); and the
same through `layers._materialized_t` (row-major copies), in float32 and bfloat16 with float32
accumulation. One JSON line per measurement.
"""

import json
import time

import jax
import jax.numpy as jnp

from llmjax.models.layers import _materialized_t


def gflops(fn, *args, flops: float, iters: int = 10) -> float:
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))  # compile + warm up
  start = time.perf_counter()
  for _ in range(iters):
    out = f(*args)
  jax.block_until_ready(out)
  return flops / ((time.perf_counter() - start) / iters) / 1e9


def main():
  m, k, n = 2048, 512, 1536
  flops = 2 * m * k * n
  f32 = dict(preferred_element_type=jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    x, w, g = (jnp.ones(s, dtype) for s in ((m, k), (k, n), (m, n)))
    cases = {
        'x @ w': (lambda x, w: jnp.dot(x, w, **f32), x, w),
        'g @ w.T': (lambda g, w: jnp.dot(g, w.T, **f32), g, w),
        'g @ materialized(w.T)': (lambda g, w: jnp.dot(g, _materialized_t(w), **f32), g, w),
        'x.T @ g': (lambda x, g: jnp.dot(x.T, g, **f32), x, g),
        'materialized(x.T) @ g': (lambda x, g: jnp.dot(_materialized_t(x), g, **f32), x, g),
    }
    for name, (fn, a, b) in cases.items():
      print(json.dumps({'dtype': jnp.dtype(dtype).name, 'matmul': name,
                        'gflops': round(gflops(fn, a, b, flops=flops), 1)}))


if __name__ == '__main__':
  main()
