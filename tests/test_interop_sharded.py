"""Sharded import on an 8-device CPU mesh: requested shardings, same values, partial reads.

Runs in a subprocess because the device count must be set (XLA_FLAGS) before jax starts, and
the rest of the suite runs on one device.
"""

import os
import subprocess
import sys

SCRIPT = r'''
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from llmjax import sharding
from llmjax.interop import load_hf, safetensors_io
from llmjax.models import Transformer, logical_axes

assert jax.device_count() == 8, jax.devices()
GOLDEN = 'tests/golden/llama_gqa_llama3'

reads = []  # (name, hf slices) of every read from disk
read = safetensors_io.Reader.read
def spy(self, name, index=None):
  out = read(self, name, index)
  reads.append((name, out.shape))
  return out
safetensors_io.Reader.read = spy

mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
# Stacked layers split over 'data' too, so each block needs only one of the two layers.
rules = (('layers', 'data'),) + sharding.FSDP_TENSOR
cfg, params, _ = load_hf(GOLDEN, mesh=mesh, rules=rules)
sharded_reads = list(reads)
want = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)
_, plain, _ = load_hf(GOLDEN)

def check(path, x, s, p):
  assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding, s)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(p), err_msg=jax.tree_util.keystr(path))
jax.tree_util.tree_map_with_path(check, params, want, plain)
q = params['layers']['attn']['q']['kernel']
assert q.sharding.spec == P('data', 'fsdp', 'tensor', None), q.sharding.spec

# q [layers, embed, heads, head_dim] over (data, fsdp, tensor): 8 distinct blocks, each one
# layer, read as a [heads/2 * head_dim, embed/2] region of that layer's q_proj.weight [64, 64].
q_reads = [s for n, s in sharded_reads if n.endswith('self_attn.q_proj.weight')]
assert sorted(q_reads) == [(32, 32)] * 8, q_reads
biggest = max(int(np.prod(s)) for _, s in sharded_reads)
assert biggest < 256 * 64, biggest  # no tensor was read whole (the largest is 256 x 64)

g = np.load(GOLDEN + '/golden.npz')
logits, _ = jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))(params, jnp.asarray(g['tokens']))
diff = float(np.max(np.abs(np.asarray(logits) - g['logits'])))
assert diff <= 1e-4, diff
print('OK', len(sharded_reads), 'reads, max logit diff', diff)
'''


# An MoE checkpoint on fsdp=2 x expert=4: the stacked experts [layers, experts, ...] split by
# expert, each device reading only its 2 of the 8 experts' tensors (and half of each, by fsdp).
# qwen2_moe_sparse_step scans a [dense, moe] period: the leaves sit under layers/block_{0,1}.
MOE_SCRIPT = r'''
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from llmjax import sharding
from llmjax.interop import load_hf, safetensors_io

assert jax.device_count() == 8, jax.devices()
GOLDEN = 'tests/golden/qwen2_moe_sparse_step'
reads = []
read = safetensors_io.Reader.read
def spy(self, name, index=None):
  out = read(self, name, index)
  reads.append((name, out.shape))
  return out
safetensors_io.Reader.read = spy

mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 1, 4, 1), sharding.MESH_AXES)
cfg, params, _ = load_hf(GOLDEN, mesh=mesh, rules=sharding.FSDP)
sharded_reads = list(reads)
_, plain, _ = load_hf(GOLDEN)
jax.tree.map(lambda x, p: np.testing.assert_array_equal(np.asarray(x), np.asarray(p)), params, plain)
gate = params['layers']['block_1']['moe']['gate']['kernel']  # [layers, experts, embed, mlp]
assert gate.sharding.spec == P(None, 'expert', 'fsdp', None), gate.sharding
assert gate.sharding.shard_shape(gate.shape) == (2, 2, 16, 16)  # 2 of 8 experts, half the embed
# Each expert tensor [moe_mlp 16, embed 32] is read as two [16, 16] halves (one per fsdp block),
# each half once per host (blocks replicated over nothing else): 2 reads per expert and layer.
expert_reads = [s for n, s in sharded_reads if '.experts.' in n and n.endswith('gate_proj.weight')]
assert sorted(expert_reads) == [(16, 16)] * (2 * 8 * 2), expert_reads
print('OK', len(sharded_reads), 'reads')
'''


def _run(script):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'OK' in result.stdout


def test_sharded_placement_on_8_cpu_devices():
  _run(SCRIPT)


def test_moe_experts_sharded_over_fsdp_and_expert():
  _run(MOE_SCRIPT)
