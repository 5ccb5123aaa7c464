"""Mesh construction and the sharding checks that run before anything compiles."""

import pytest

from llmjax import config as config_lib
from llmjax import plan as plan_lib
from llmjax import sharding
from llmjax.errors import ConfigError
from llmjax.models.config import ModelConfig


def cfg(rules='fsdp', batch=8, grad_accum=1, **mesh):
  c = config_lib.base_config('tiny', vocab_size=128, num_layers=2, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, mlp_dim=96, max_seq_len=64)
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.mesh.update(mesh)
  c.sharding.rules = rules
  c.train.batch_size, c.train.grad_accum = batch, grad_accum
  return c, ModelConfig.from_dict(c.model)


def test_minus_one_is_inferred_and_dcn_multiplies():
  c, m = cfg(data=2)
  assert sharding.validate(c, m, 8) == {'data': 2, 'fsdp': 4, 'sequence': 1, 'expert': 1, 'tensor': 1}
  c, m = cfg(data=1, fsdp=-1, dcn_data=2)
  assert sharding.validate(c, m, 8, slices=2) == {'data': 2, 'fsdp': 4, 'sequence': 1, 'expert': 1, 'tensor': 1}


@pytest.mark.parametrize('kw, n, message', [
    (dict(data=2, fsdp=2), 8, r'data=2 x fsdp=2 x sequence=1 x expert=1 x tensor=1 = 4 devices, but there are 8; set one'),
    (dict(data=-1, fsdp=-1), 8, r"only one axis may be -1"),
    (dict(fsdp=3, data=-1), 8, r"fixed axes' product 3 does not divide the 8 devices"),
    (dict(rules='fsdp_tensor', fsdp=-1, tensor=4), 8,
     r"mesh.tensor=4 does not divide model.num_kv_heads=2 .*use a size in \[1, 2\]"),
    (dict(rules='fsdp_tensor', fsdp=-1, tensor=8, batch=1), 8,
     r"mesh.tensor=8 does not divide model.num_heads=4"),
    # 'fsdp' maps only the vocabulary to tensor: the blocks would be replicated over it.
    (dict(rules='fsdp', fsdp=-1, tensor=2), 8,
     r"mesh.tensor=2 but sharding.rules='fsdp' splits no block \(heads, mlp\) over tensor.*"
     r"use sharding.rules='fsdp_tensor' or mesh.tensor=1"),
    (dict(rules='fsdp_tensor', fsdp=1, tensor=-1), 64,
     r"mesh.tensor=64 does not divide model.num_heads=4"),
    (dict(batch=12), 8, r"train.batch_size=12 is not divisible by data x fsdp x expert = 8 .* multiple of 8"),
    (dict(batch=8, grad_accum=2), 8, r"multiple of 16"),
    (dict(rules='data', tensor=2), 8, r"mesh.tensor=2 but sharding.rules='data' never uses"),
    (dict(rules='ring'), 8, r"sharding.rules='ring' is unknown"),
    (dict(sequence=3), 3, r"mesh.sequence=3 does not divide data.seq_len=256; use a divisor"),
    (dict(dcn_data=2), 8, r"the product of mesh.dcn_\* = 2 but the devices form 1 slice"),
])
def test_bad_meshes_are_one_line_errors(kw, n, message):
  c, m = cfg(**kw)
  with pytest.raises(ConfigError, match=message) as e:
    sharding.validate(c, m, n, slices=1)
  assert '\n' not in str(e.value)


def test_mlp_width_not_divisible_by_tensor():
  c, _ = cfg(rules='fsdp_tensor', tensor=2)
  c.model.mlp_dim = 97
  with pytest.raises(ConfigError, match=r'mesh.tensor=2 does not divide model.mlp_dim=97'):
    sharding.validate(c, ModelConfig.from_dict(c.model), 8)


def test_fsdp_tensor_rules_put_heads_and_mlp_on_tensor_and_embed_on_fsdp():
  import flax.linen as nn
  r = sharding.RULES['fsdp_tensor']
  lm = lambda axes: tuple(nn.logical_to_mesh_axes(axes, r))
  assert lm(('embed', 'heads', 'head_dim')) == ('fsdp', 'tensor', None)  # q kernel
  assert lm(('embed', 'kv_heads', 'head_dim')) == ('fsdp', 'tensor', None)
  assert lm(('mlp', 'embed')) == ('tensor', 'fsdp')
  assert lm(('vocab', 'embed')) == ('tensor', 'fsdp')
  # Activations: positions over `sequence` (a size-1 axis unless mesh.sequence > 1).
  assert lm(('batch', 'length', 'embed')) == (('data', 'fsdp', 'expert'), 'sequence', None)
  assert lm(('batch', 'length', 'heads', 'head_dim')) == (('data', 'fsdp', 'expert'), 'sequence', 'tensor',
                                                          None)
  assert lm(('batch', 'length', 'vocab')) == (('data', 'fsdp', 'expert'), 'sequence', 'tensor')
  assert lm(('layers', 'embed', 'mlp')) == (None, 'fsdp', 'tensor')  # scanned stack
  assert lm(('expert', 'embed', 'mlp')) == ('expert', 'fsdp', 'tensor')  # MoE experts


def test_hybrid_mesh_over_two_slices_keeps_each_slice_inside_one_data_index():
  devices = plan_lib.get_topology('v5e:2x2', slices=2)
  c, _ = cfg(fsdp=-1, dcn_data=2)
  mesh = sharding.make_mesh(c.mesh, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'sequence': 1, 'expert': 1, 'tensor': 1}
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}  # only gradients cross DCN
