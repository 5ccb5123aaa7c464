"""The generation engine on 8 emulated CPU devices: the KV cache is laid out by the logical
rules (batch, kv heads, and its slots for long contexts) and generation gives the tokens of
one device; a decode step over a cache split along its slots (flash-decoding's combine of
per-device log-sum-exps) equals attention over the whole cache.

As in test_sharding_multidevice, each test runs this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; the script prints one JSON line.
"""

import json
import os
import subprocess
import sys

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_scenario(name: str, timeout: int = 300) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, HERE, name], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decode_over_a_cache_split_along_its_slots_equals_the_whole_cache():
  out = run_scenario('split_decode')
  for case, err in out['errors'].items():
    assert err <= 1e-5, (case, err)
  # The cache was never gathered: each device's kernel saw a quarter of the slots.
  assert out['local_slots'] == out['slots'] // 4


def test_sharded_generation_gives_the_single_device_tokens_and_lays_the_cache_out():
  out = run_scenario('generate')
  for mesh, tokens in out['tokens'].items():
    assert tokens == out['single'], mesh
  # fsdp_tensor rules, mesh data=2 x sequence=2 x tensor=2: [layers, batch, slots, kv heads,
  # head_dim] -> batch over (data, fsdp), slots over sequence, kv heads over tensor.
  assert out['cache_spec'] == [None, 'data', 'sequence', 'tensor', None]  # fsdp=1 is dropped
  assert out['cache_bytes_per_device'] * 8 == out['cache_bytes']


# ----------------------------------------------------------------------------- scenarios

def _mesh(**sizes):
  import jax
  from jax.sharding import AxisType
  from llmjax import sharding
  shape = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def scenario_split_decode():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from llmjax import sharding
  from llmjax.kernels import decode_attention as da
  from llmjax.kernels import sharded
  from llmjax.kernels.mask import Mask
  from llmjax.kernels.reference import reference_attention

  batch, slots, heads, kv_heads, head_dim = 4, 512, 4, 2, 64
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (batch, 1, heads, head_dim))
  k = jax.random.normal(kk, (batch, slots, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, slots, kv_heads, head_dim))
  # Row lengths ending in the first, second and last of 4 slices of 128 slots, and 0 (empty).
  lengths = jnp.array([5, 200, 512, 0], jnp.int32)
  mesh = _mesh(data=2, sequence=4)
  seen = []

  def kernel(q, k, v, mask, **kw):
    seen.append(k.shape[1])
    return da.decode_attention(q, k, v, mask, block_sizes=da.BlockSizes(block_k=64),
                               interpret=True, **kw)

  errors = {}
  for window in (0, 100):
    mask = Mask(causal=True, sliding_window=window, q_offset=jnp.maximum(lengths - 1, 0),
                kv_lengths=lengths)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.FSDP):
      out = jax.jit(lambda q, k, v, m: sharded.shard_decode_attention(kernel, q, k, v, m))(
          q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    errors[f'window={window}'] = float(jnp.max(jnp.abs(out - ref)))
  return {'errors': errors, 'slots': slots, 'local_slots': seen[0]}


def scenario_generate():
  import flax.linen as nn
  import jax
  import numpy as np
  from llmjax import sharding
  from llmjax.infer import engine
  from llmjax.models import get_preset, init_params

  cfg = get_preset('tiny', vocab_size=128, num_layers=2, embed_dim=64, num_heads=4,
                   num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 128, n).tolist() for n in (3, 9, 17, 5)]
  sp = engine.SamplingParams(max_new_tokens=4, temperature=0.0)
  run = lambda c: [x.ids for x in engine.generate(c, params, prompts, sp, eos_id=-1)]
  single = run(cfg)
  tokens, out = {}, {}
  # One mesh (each compiles the engine's programs anew): every cache axis split at once.
  for name, rules, sizes in [('data2_seq2_tensor2', sharding.FSDP_TENSOR,
                              dict(data=2, sequence=2, tensor=2))]:
    mesh = _mesh(**sizes)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      placed = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
      tokens[name] = [x.ids for x in engine.generate(cfg, placed, prompts, sp, eos_id=-1)]
      if name == 'data2_seq2_tensor2':
        cache = engine.new_cache(cfg, 4, 64)
        spec = cache.k.sharding.spec
        out['cache_spec'] = [list(s) if isinstance(s, tuple) else s for s in
                             tuple(spec) + (None,) * (cache.k.ndim - len(spec))]
        out['cache_bytes'] = cache.k.nbytes
        out['cache_bytes_per_device'] = cache.k.addressable_shards[0].data.nbytes
  return {'single': single, 'tokens': tokens, **out}


if __name__ == '__main__':
  result = {'split_decode': scenario_split_decode,
            'generate': scenario_generate}[sys.argv[1]]()
  print(json.dumps(result))
