"""Expert parallelism on 8 emulated CPU devices: a tiny MoE trained with mesh.expert=4 combined
with fsdp (batch over expert x fsdp) and with tensor axes gives the single-device losses, router losses and gradient
norms, and the stacked expert weights (and their Adam moments) are split over `expert`.

As in test_sharding_multidevice, the scenario runs as a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and prints one JSON line.
"""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 3
MESHES = {'expert=4,fsdp=2': dict(expert=4, fsdp=2),
          'expert=4,tensor=2': dict(rules='fsdp_tensor', expert=4, tensor=2)}


def test_expert_parallel_meshes_give_the_single_device_losses():
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8',
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, HERE], env=env, capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  ref = out.pop('single')
  assert ref['loss'][-1] < ref['loss'][0]  # it trains
  for mesh in MESHES:
    for key in ('loss', 'aux_loss', 'router_z_loss', 'grad_norm'):
      np.testing.assert_allclose(out[mesh][key], ref[key], rtol=2e-5, err_msg=f'{mesh} {key}')
  # [expert, embed, mlp]: experts over `expert`, embed over fsdp (ZeRO-3), as the rules say.
  assert out['expert=4,fsdp=2']['gate_spec'] == ['expert', 'fsdp', None]
  assert out['expert=4,tensor=2']['gate_spec'] == ['expert', 'fsdp', 'tensor']  # fsdp=1 here
  assert out['expert=4,fsdp=2']['gate_mu_spec'] == ['expert', 'fsdp', None]


def _main():
  import flax.linen as nn
  import jax
  from llmjax import config as config_lib
  from llmjax import sharding
  from llmjax.models.config import ModelConfig
  from llmjax.train.loop import make_trainer

  rng = np.random.default_rng(0)
  length, batch = 32, 8
  pool = rng.integers(0, 128, (16, length + 1))
  batches = []
  for _ in range(STEPS):
    rows = pool[rng.integers(0, 16, batch)]
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2:] = 2
    seg[::3, -5:] = 0  # padding: routed, not counted in the router statistics
    pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0).astype(np.int32)
    batches.append({'inputs': rows[:, :-1].astype(np.int32),
                    'targets': rows[:, 1:].astype(np.int32), 'segment_ids': seg, 'positions': pos,
                    'loss_mask': ((rng.random((batch, length)) > 0.2) & (seg > 0)).astype(
                        np.float32)})

  def run(devices=None, rules='fsdp', **mesh):
    c = config_lib.base_config('tiny-moe', vocab_size=128, num_layers=2, embed_dim=64,
                               num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                               moe_mlp_dim=32, max_seq_len=64, router_z_loss_coef=0.001,
                               scan_layers=True)
    c.train.update(dict(steps=100, lr=3e-3, warmup_steps=2, batch_size=batch))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1, expert=1))
    c.mesh.update(mesh)
    c.sharding.rules = rules
    cfg = ModelConfig.from_dict(c.model)
    m = sharding.make_mesh(c.mesh, devices)
    rules_ = sharding.rules_from_config(c)
    tr = make_trainer(c, cfg, m, rules_)
    out = {k: [] for k in ('loss', 'aux_loss', 'router_z_loss', 'grad_norm')}
    with jax.set_mesh(m), nn.logical_axis_rules(rules_):
      state = tr.init(jax.random.key(0))
      gate = state.params['layers']['moe']['gate']['kernel']
      spec = lambda a: [s if s is None or isinstance(s, str) else list(s) for s in
                        list(a.sharding.spec) + [None] * (a.ndim - len(a.sharding.spec))]
      out['gate_spec'] = spec(gate)[1:]  # after the stacked layers dim
      out['gate_mu_spec'] = spec(state.opt_state[1][0].mu['layers']['moe']['gate']['kernel'])[1:]
      for b in batches:
        state, metrics = tr.train_step(state, {k: jax.device_put(v, tr.batch_sharding)
                                               for k, v in b.items()})
        for k in ('loss', 'aux_loss', 'router_z_loss', 'grad_norm'):
          out[k].append(float(metrics[k]))
    return out

  result = {'single': run(jax.devices()[:1])}
  for name, kw in MESHES.items():
    result[name] = run(**kw)
  print(json.dumps(result))


if __name__ == '__main__':
  _main()
