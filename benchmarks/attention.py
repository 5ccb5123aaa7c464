"""Attention kernels vs XLA (vs cuDNN on GPU): TFLOP/s and peak memory, forward and fwd+bwd.

    python benchmarks/attention.py                      # sequences 1k..32k on the accelerator
    python benchmarks/attention.py --seq=4096 --causal=0 --heads=32 --kv_heads=8

On a GPU it measures the Pallas Triton kernel, cuDNN (jax.nn.dot_product_attention) and XLA; on a
TPU the Mosaic kernel and XLA; on a CPU (no accelerator) it says so and runs a tiny smoke
configuration with the kernels interpreted (the numbers then mean nothing). One JSON line per
measurement. FLOPs count the visible part of the mask only (causal: about half), so TFLOP/s
compare fairly between implementations that skip masked blocks and those that don't.
Peak memory: XLA's memory analysis of the compiled program (temp + arguments + outputs), which
is what a kernel saves by not materialising the [T, S] logits.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import dispatch
from llmjax.models.attention import Mask, xla_attention


def implementations(backend: str) -> dict:
  if backend == 'gpu':
    return {'pallas_gpu': dispatch.pallas_gpu, 'cudnn': dispatch.cudnn, 'xla': xla_attention}
  if backend == 'tpu':
    return {'pallas_tpu': dispatch.pallas_tpu, 'xla': xla_attention}
  return {'pallas_tpu': dispatch.pallas_tpu, 'pallas_gpu': dispatch.pallas_gpu,
          'xla': xla_attention}


def visible_fraction(t: int, causal: bool, window: int) -> float:
  mask = Mask(causal=causal, sliding_window=window).dense(min(t, 2048), min(t, 2048))
  return float(np.mean(np.asarray(mask)))  # estimated on at most 2k x 2k


def measure(fn, args, iters: int) -> tuple[float, int]:
  """(seconds per call, peak bytes) of a jitted fn."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  peak = -1
  if mem is not None:
    peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)
  jax.block_until_ready(compiled(*args))  # warm up
  start = time.perf_counter()
  for _ in range(iters):
    out = compiled(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters, peak


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seq', type=int, nargs='*', default=None, help='sequence lengths')
  p.add_argument('--batch', type=int, default=None, help='default: 16k tokens per batch')
  p.add_argument('--heads', type=int, default=16)
  p.add_argument('--kv_heads', type=int, default=4)
  p.add_argument('--head_dim', type=int, default=128)
  p.add_argument('--causal', type=int, default=1)
  p.add_argument('--window', type=int, default=0)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--iters', type=int, default=10)
  a = p.parse_args()

  backend = jax.default_backend()
  seqs, heads, kv_heads, head_dim, iters = a.seq, a.heads, a.kv_heads, a.head_dim, a.iters
  if backend == 'cpu':
    print(json.dumps({'note': 'no accelerator found: tiny smoke configuration on CPU, kernels '
                              'interpreted; timings are not meaningful'}))
    seqs, heads, kv_heads, head_dim, iters = seqs or [256], 2, 1, 64, 1
    a.batch = a.batch or 2
  seqs = seqs or [1024, 2048, 4096, 8192, 16384, 32768]
  dtype = jnp.dtype(a.dtype)
  device = jax.devices()[0].device_kind

  for t in seqs:
    batch = a.batch or max(1, 16384 // t)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim), dtype)
    mask = Mask(causal=bool(a.causal), sliding_window=a.window)
    # 2 matmuls (QK^T, PV) of 2*T*S*H flops per head forward; the backward does 5 (2.5x).
    fwd_flops = 4 * batch * heads * t * t * head_dim * visible_fraction(t, a.causal, a.window)
    for name, impl in implementations(backend).items():
      for mode in ('fwd', 'fwd_bwd'):
        record = {'impl': name, 'mode': mode, 'device': device, 'seq': t, 'batch': batch,
                  'heads': heads, 'kv_heads': kv_heads, 'head_dim': head_dim,
                  'causal': bool(a.causal), 'window': a.window, 'dtype': dtype.name}
        if mode == 'fwd':
          fn = lambda q, k, v, impl=impl: impl(q, k, v, mask)
          flops = fwd_flops
        else:
          loss = lambda q, k, v, impl=impl: jnp.sum(impl(q, k, v, mask).astype(jnp.float32))
          fn = jax.grad(loss, argnums=(0, 1, 2))
          flops = 3.5 * fwd_flops
        try:
          seconds, peak = measure(fn, (q, k, v), iters)
          record.update(ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 2),
                        peak_bytes=peak)
        except Exception as e:  # e.g. XLA out of memory at 32k: report it and go on
          record['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
        print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
