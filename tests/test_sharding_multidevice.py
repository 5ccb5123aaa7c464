"""Training on 8 emulated CPU devices: every mesh gives the losses of one device, tensors are
sharded as the rules say, and a checkpoint restores onto another mesh shape.

The main pytest process may already have started JAX with one device, so each test runs this
file as a script in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 set
before JAX starts; the script prints one JSON line that the test checks.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 8


def run_scenario(name: str, *args: str, timeout: int = 300) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, HERE, name, *args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_mesh_gives_the_single_device_losses():
  out = run_scenario('equivalence')
  ref = np.array(out['single'])
  assert len(ref) == STEPS and ref[-1] < ref[0]  # it trains
  for mesh, losses in out.items():
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=mesh)


def test_params_and_optimizer_state_are_sharded_as_the_rules_say():
  out = run_scenario('shardings')
  # fsdp=4 x tensor=2 with rules fsdp_tensor (see `scenario_shardings` for the expectations).
  assert out['q']['spec'] == ['fsdp', 'tensor', None]
  assert out['q']['per_device_bytes'] * 8 == out['q']['bytes']
  assert out['down']['spec'] == ['tensor', 'fsdp']
  assert out['down']['per_device_bytes'] * 8 == out['down']['bytes']
  assert out['embedding']['spec'] == ['tensor', 'fsdp']
  assert out['mu_q']['spec'] == out['q']['spec']  # Adam moments follow their params
  assert out['mu_q']['per_device_bytes'] * 8 == out['mu_q']['bytes']
  assert out['norm']['spec'] == ['fsdp']
  assert out['norm']['per_device_bytes'] * 4 == out['norm']['bytes']  # replicated over tensor
  assert out['total_per_device'] * 8 == out['total']  # every weight is split 8 ways
  # data=2 x fsdp=4: params split 4 ways, replicated over data.
  assert out['hsdp_q']['spec'] == ['fsdp', None, None]
  assert out['hsdp_q']['per_device_bytes'] * 4 == out['hsdp_q']['bytes']
  # Pure data parallel: replicated.
  assert out['dp_q']['per_device_bytes'] == out['dp_q']['bytes']


def test_checkpoint_from_fsdp8_restores_on_data2_tensor4_and_training_continues(tmp_path):
  out = run_scenario('restore', str(tmp_path))
  np.testing.assert_allclose(out['resumed'], out['uninterrupted'][STEPS // 2:], rtol=1e-5)
  assert out['restored_q_spec'] == ['fsdp', 'tensor', None]  # fsdp has size 1 here


def test_sequence_parallel_meshes_give_the_single_device_losses():
  out = run_scenario('sequence')
  ref = np.array(out.pop('single'))
  assert ref[-1] < ref[0]
  for mesh, losses in out.items():
    np.testing.assert_allclose(losses, ref[:len(losses)], rtol=1e-5, err_msg=mesh)


def test_lora_with_chunked_loss_on_fsdp_tensor_gives_the_single_device_losses():
  out = run_scenario('lora')
  ref = np.array(out['single'])
  assert ref[-1] < ref[0]
  np.testing.assert_allclose(out['fsdp=4,tensor=2'], ref, rtol=1e-5)
  # Adapters follow their kernel's logical axes; the rank dim stays whole.
  assert out['lora_a_q']['spec'] == ['fsdp', None]  # [embed, rank]
  assert out['lora_b_q']['spec'] == [None, 'tensor', None]  # [rank, heads, head_dim]
  assert out['base_unchanged']


# --- The subprocess side ------------------------------------------------------------------------

def _config(rules='fsdp', kv_heads=2, **mesh):
  from llmjax import config as config_lib
  c = config_lib.base_config('tiny', vocab_size=128, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=kv_heads, head_dim=16, mlp_dim=128, max_seq_len=64)
  c.train.update(dict(steps=100, lr=3e-3, warmup_steps=5, batch_size=8))
  c.mesh.update(dict(data=1, fsdp=1, tensor=1))
  c.mesh.update(mesh)
  c.sharding.rules = rules
  return c


def _trainer(c, devices=None):
  from llmjax import sharding
  from llmjax.models.config import ModelConfig
  from llmjax.train.loop import make_trainer
  cfg = ModelConfig.from_dict(c.model)
  mesh = sharding.make_mesh(c.mesh, devices)
  return mesh, make_trainer(c, cfg, mesh, sharding.rules_from_config(c))


def _batches(n, batch=8, length=32, vocab=128):
  # Rows drawn from a pool of 16 fixed sequences: learnable, so the loss falls within 20 steps.
  rng = np.random.default_rng(0)
  pool = rng.integers(0, vocab, (16, length + 1))
  out = []
  for _ in range(n):
    rows = pool[rng.integers(0, 16, batch)]
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0)
    out.append({'inputs': rows[:, :-1].astype(np.int32), 'targets': rows[:, 1:].astype(np.int32),
                'segment_ids': seg, 'positions': pos.astype(np.int32),
                'loss_mask': (rng.random((batch, length)) > 0.2).astype(np.float32)})
  return out


def _train(mesh, trainer, batches, state=None, rules=()):
  """`rules`: the logical rules to trace under, as the train loop does (activation constraints
  and the Pallas kernels' shard_map specs read them)."""
  import flax.linen as nn
  import jax
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if state is None:
      state = trainer.init(jax.random.key(0))
    for b in batches:
      b = {k: jax.device_put(v, trainer.batch_sharding) for k, v in b.items()}
      state, m = trainer.train_step(state, b)
      losses.append(float(m['loss']))
  return state, losses


def scenario_equivalence():
  import jax
  batches = _batches(STEPS)
  meshes = {'single': dict(rules='fsdp'), 'data=8': dict(rules='data', data=8),
            'fsdp=8': dict(fsdp=8), 'data=2,fsdp=4': dict(data=2, fsdp=4),
            'fsdp=4,tensor=2': dict(rules='fsdp_tensor', fsdp=4, tensor=2)}
  out = {}
  for name, kw in meshes.items():
    devices = jax.devices()[:1] if name == 'single' else None
    mesh, tr = _trainer(_config(**kw), devices)
    out[name] = _train(mesh, tr, batches)[1]
  return out


def _describe(arr):
  spec = list(arr.sharding.spec) + [None] * (arr.ndim - len(arr.sharding.spec))
  spec = [s if s is None or isinstance(s, str) else list(s) for s in spec]
  shard = arr.addressable_shards[0].data
  return {'spec': spec, 'bytes': arr.nbytes, 'per_device_bytes': shard.nbytes}


def scenario_shardings():
  import jax
  out = {}
  mesh, tr = _trainer(_config(rules='fsdp_tensor', fsdp=4, tensor=2))
  with jax.set_mesh(mesh):
    state = tr.init(jax.random.key(0))
  p = state.params
  out['q'] = _describe(p['layer_0']['attn']['q']['kernel'])  # [embed, heads, head_dim]
  out['down'] = _describe(p['layer_0']['mlp']['down']['kernel'])  # [mlp, embed]
  out['embedding'] = _describe(p['embed']['embedding'])  # [vocab, embed]
  out['norm'] = _describe(p['layer_0']['attn_norm']['scale'])  # [embed]
  adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
  out['mu_q'] = _describe(adam.mu['layer_0']['attn']['q']['kernel'])
  # Every leaf (params and moments) of a config whose dims all split over fsdp x tensor...
  leaves = [x for x in jax.tree.leaves((p, adam.mu, adam.nu)) if x.ndim >= 2]
  out['total'] = sum(x.nbytes for x in leaves)
  out['total_per_device'] = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  # ...and each shard really lives on its own device: 8 distinct devices hold pieces of q.
  assert len({s.device for s in p['layer_0']['attn']['q']['kernel'].addressable_shards}) == 8
  mesh, tr = _trainer(_config(data=2, fsdp=4))
  with jax.set_mesh(mesh):
    out['hsdp_q'] = _describe(tr.init(jax.random.key(0)).params['layer_0']['attn']['q']['kernel'])
  mesh, tr = _trainer(_config(rules='data', data=8))
  with jax.set_mesh(mesh):
    out['dp_q'] = _describe(tr.init(jax.random.key(0)).params['layer_0']['attn']['q']['kernel'])
  return out


def scenario_restore(workdir):
  import jax
  from llmjax.train import checkpoint
  batches = _batches(STEPS)
  half = STEPS // 2
  mesh, tr = _trainer(_config(fsdp=8, kv_heads=4))
  _, uninterrupted = _train(mesh, tr, batches)
  state, _ = _train(mesh, tr, batches[:half])
  manager = checkpoint.make_manager(workdir, max_to_keep=1, async_save=False)
  checkpoint.save(manager, half, state, force=True)
  manager.wait_until_finished()
  del state
  mesh2, tr2 = _trainer(_config(rules='fsdp_tensor', data=2, tensor=4, kv_heads=4))
  with jax.set_mesh(mesh2):
    restored = checkpoint.restore(manager, tr2.abstract_state)
  q = restored.params['layer_0']['attn']['q']['kernel']
  assert q.sharding == tr2.state_shardings.params['layer_0']['attn']['q']['kernel']
  q_spec = _describe(q)['spec']
  _, resumed = _train(mesh2, tr2, batches[half:], restored)  # donates `restored`
  return {'uninterrupted': uninterrupted, 'resumed': resumed, 'restored_q_spec': q_spec}


def scenario_sequence():
  # Packed rows (two documents each) split over `sequence`: XLA gathers keys itself; the
  # Pallas kernel (interpreted here) gets gathered K/V and its slice's q_offset.
  import jax
  from llmjax import sharding
  batches = _batches(STEPS)
  meshes = {'single': dict(rules='fsdp'), 'data=2,sequence=4': dict(data=2, sequence=4),
            'fsdp=2,sequence=2,tensor=2': dict(rules='fsdp_tensor', fsdp=2, sequence=2, tensor=2),
            'pallas fsdp=2,sequence=4': dict(fsdp=2, sequence=4, attention='pallas')}
  out = {}
  for name, kw in meshes.items():
    attention = kw.pop('attention', 'xla')
    c = _config(**kw)
    c.model.attention = attention
    c.data.seq_len = 32
    devices = jax.devices()[:1] if name == 'single' else None
    mesh, tr = _trainer(c, devices)
    n = 3 if attention == 'pallas' else STEPS  # the interpreted kernel is slow on a CPU
    out[name] = _train(mesh, tr, batches[:n], rules=sharding.rules_from_config(c))[1]
  return out


def scenario_lora():
  import jax
  from llmjax import sharding
  from llmjax.models import lora
  batches = _batches(STEPS)
  out = {}
  for name, kw in {'single': dict(rules='fsdp'),
                   'fsdp=4,tensor=2': dict(rules='fsdp_tensor', fsdp=4, tensor=2)}.items():
    c = _config(**kw)
    c.model.lora_rank = 4
    c.model.lora_targets = ['q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head']
    c.data.seq_len = 32
    c.train.loss_chunk = 8
    mesh, tr = _trainer(c, jax.devices()[:1] if name == 'single' else None)
    with jax.set_mesh(mesh):
      before = jax.device_get(lora.split(tr.init(jax.random.key(0)).params)[1])
    state, out[name] = _train(mesh, tr, batches, rules=sharding.rules_from_config(c))
    after = jax.device_get(lora.split(state.params)[1])
    out['base_unchanged'] = out.get('base_unchanged', True) and all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), before, after)))
  q = state.params['layer_0']['attn']['q']
  out['lora_a_q'] = _describe(q['lora_a'])
  out['lora_b_q'] = _describe(q['lora_b'])
  return out


if __name__ == '__main__':
  result = {'equivalence': scenario_equivalence, 'shardings': scenario_shardings,
            'restore': scenario_restore, 'lora': scenario_lora, 'sequence': scenario_sequence}[sys.argv[1]](*sys.argv[2:])
  print(json.dumps(result))
