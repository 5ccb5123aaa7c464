"""Hugging Face import/export of the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE).

Logit and greedy parity with transformers is tests/test_interop_hf.py's, on the MoE goldens of
tools/make_moe_goldens.py; here: the round trip is exact (the export holds the source's tensors
bit for bit, and re-imports to the same params), the config.json fields map both ways, LoRA on
the attention of an imported MoE model trains, and bad input is a one-line error.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from llmjax import config as config_lib
from llmjax import sharding
from llmjax.errors import CheckpointError, ConfigError
from llmjax.interop import config_from_hf, config_to_hf, load_hf, save_hf
from llmjax.interop.families import MOE_ARCHITECTURES
from llmjax.models.config import architecture_diffs, get_preset
from llmjax.models import lora
from llmjax.models.config import ModelConfig

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
MOE_GOLDENS = ['mixtral_window', 'qwen2_moe_shared', 'qwen2_moe_sparse_step', 'qwen3_moe_mlp_only']


def hf_config(name: str) -> dict:
  with open(os.path.join(GOLDEN, name, 'config.json')) as f:
    return json.load(f)


@functools.cache
def loaded(name, **overrides):
  return load_hf(os.path.join(GOLDEN, name), **overrides)


def tensors(d) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith('.safetensors'):
      with safe_open(os.path.join(d, f), 'np') as st:
        out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


def test_goldens_cover_every_moe_family():
  assert {hf_config(n)['architectures'][0] for n in MOE_GOLDENS} == set(MOE_ARCHITECTURES)


@pytest.mark.parametrize('name, scan', [(n, True) for n in MOE_GOLDENS]
                         + [('qwen3_moe_mlp_only', False)])
def test_round_trip_is_exact(name, scan, tmp_path):
  src = os.path.join(GOLDEN, name)
  cfg, params, _ = loaded(name, scan_layers=scan)
  save_hf(str(tmp_path), cfg, params)
  theirs, ours = tensors(src), tensors(tmp_path)
  assert sorted(ours) == sorted(theirs)
  for k in theirs:  # per-expert tensors split back out of the stacked leaves, bit for bit
    assert ours[k].shape == theirs[k].shape and np.array_equal(ours[k], theirs[k]), k
  cfg2, params2, _ = load_hf(str(tmp_path), scan_layers=scan)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  assert config_to_hf(cfg)['architectures'] == hf_config(name)['architectures']


def test_config_fields_map_both_ways():
  mixtral = loaded('mixtral_window')[0]
  assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_mlp_dim,
          mixtral.norm_topk_prob, mixtral.sliding_window, mixtral.shared_expert_mlp_dim) == (
              4, 2, 48, True, 8, 0)
  # output_router_logits=true: transformers adds the aux loss with this coefficient.
  assert mixtral.router_aux_loss_coef == 0.02
  hf = config_to_hf(mixtral)
  assert (hf['num_local_experts'], hf['intermediate_size'], hf['sliding_window'],
          hf['output_router_logits'], hf['router_aux_loss_coef']) == (4, 48, 8, True, 0.02)

  shared = loaded('qwen2_moe_shared')[0]
  assert (shared.shared_expert_mlp_dim, shared.moe_mlp_dim, shared.mlp_dim, shared.norm_topk_prob,
          shared.qkv_bias, shared.decoder_sparse_step) == (40, 24, 64, False, True, 1)
  # output_router_logits=false: transformers trains without the aux loss.
  assert shared.router_aux_loss_coef == 0.0
  hf = config_to_hf(shared)
  assert (hf['shared_expert_intermediate_size'], hf['moe_intermediate_size'],
          hf['intermediate_size'], hf['num_experts'], hf['output_router_logits']) == (
              40, 24, 64, 4, False)

  step = loaded('qwen2_moe_sparse_step')[0]
  assert step.decoder_sparse_step == 2 and step.moe_layers == (False, True, False, True)
  assert (step.num_experts, step.num_experts_per_tok, step.norm_topk_prob) == (8, 3, True)

  qwen3 = loaded('qwen3_moe_mlp_only')[0]
  assert (qwen3.qk_norm, qwen3.mlp_only_layers, qwen3.head_dim, qwen3.qkv_bias) == (
      True, (1,), 16, False)
  assert qwen3.moe_layers == (True, False, True)
  hf = config_to_hf(qwen3)
  assert (hf['mlp_only_layers'], hf['num_experts'], hf['head_dim'], hf['norm_topk_prob']) == (
      [1], 8, 16, True)
  # Every mapped field comes back: config.json -> ModelConfig -> config.json -> ModelConfig.
  for cfg in (mixtral, shared, step, qwen3):
    assert config_from_hf(config_to_hf(cfg)) == cfg


# The config.json files of the published checkpoints (architecture fields as on the Hub, written
# by transformers 4.x): each maps onto llmjax's preset, whose parameter counts test_moe checks
# against the published ones.
PUBLISHED = {
    'mixtral-8x7b': {
        'architectures': ['MixtralForCausalLM'], 'hidden_act': 'silu', 'hidden_size': 4096,
        'intermediate_size': 14336, 'max_position_embeddings': 32768, 'model_type': 'mixtral',
        'num_attention_heads': 32, 'num_experts_per_tok': 2, 'num_hidden_layers': 32,
        'num_key_value_heads': 8, 'num_local_experts': 8, 'output_router_logits': False,
        'rms_norm_eps': 1e-05, 'rope_theta': 1000000.0, 'router_aux_loss_coef': 0.02,
        'sliding_window': None, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
        'vocab_size': 32000},
    'qwen1.5-moe-a2.7b': {
        'architectures': ['Qwen2MoeForCausalLM'], 'hidden_act': 'silu', 'hidden_size': 2048,
        'intermediate_size': 5632, 'max_position_embeddings': 8192, 'max_window_layers': 21,
        'model_type': 'qwen2_moe', 'num_attention_heads': 16, 'num_hidden_layers': 24,
        'num_key_value_heads': 16, 'rms_norm_eps': 1e-06, 'rope_theta': 1000000.0,
        'sliding_window': 32768, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
        'use_sliding_window': False, 'vocab_size': 151936, 'decoder_sparse_step': 1,
        'moe_intermediate_size': 1408, 'shared_expert_intermediate_size': 5632,
        'num_experts_per_tok': 4, 'num_experts': 60, 'norm_topk_prob': False,
        'output_router_logits': False, 'router_aux_loss_coef': 0.001},
    'qwen3-30b-a3b': {
        'architectures': ['Qwen3MoeForCausalLM'], 'attention_bias': False,
        'decoder_sparse_step': 1, 'head_dim': 128, 'hidden_act': 'silu', 'hidden_size': 2048,
        'intermediate_size': 6144, 'max_position_embeddings': 40960, 'max_window_layers': 48,
        'mlp_only_layers': [], 'model_type': 'qwen3_moe', 'moe_intermediate_size': 768,
        'norm_topk_prob': True, 'num_attention_heads': 32, 'num_experts': 128,
        'num_experts_per_tok': 8, 'num_hidden_layers': 48, 'num_key_value_heads': 4,
        'output_router_logits': False, 'rms_norm_eps': 1e-06, 'rope_scaling': None,
        'rope_theta': 1000000.0, 'router_aux_loss_coef': 0.001, 'sliding_window': None,
        'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'use_sliding_window': False,
        'vocab_size': 151936},
}


@pytest.mark.parametrize('preset', list(PUBLISHED))
def test_published_configs_map_to_the_presets(preset):
  cfg = config_from_hf(PUBLISHED[preset])
  assert architecture_diffs(get_preset(preset), cfg) == []
  assert cfg.param_dtype == 'bfloat16'


def test_transformers4_and_5_spellings():
  # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, 4.x as num_experts.
  hf = hf_config('qwen3_moe_mlp_only')
  assert 'num_local_experts' in hf
  four = {k: v for k, v in hf.items() if k != 'num_local_experts'}
  assert config_from_hf(dict(four, num_experts=8)) == config_from_hf(hf)
  # Qwen2-MoE: 4.x has no qkv_bias key (the biases are always there).
  hf = {k: v for k, v in hf_config('qwen2_moe_shared').items() if k != 'qkv_bias'}
  assert config_from_hf(hf).qkv_bias
  # Qwen2-MoE's default layer_types slide every other layer: refused (llmjax has one window).
  hf = {k: v for k, v in hf_config('qwen2_moe_shared').items() if k != 'layer_types'}
  with pytest.raises(ConfigError, match='slides 1 of 2 layers'):
    config_from_hf(dict(hf, use_sliding_window=True, sliding_window=8))


@pytest.mark.parametrize('name, fields, message', [
    ('mixtral_window', {'num_experts_per_tok': 5},
     'num_experts_per_tok=5 is larger than num_local_experts=4'),
    ('mixtral_window', {'router_jitter_noise': 0.1},
     r'router_jitter_noise=0.1 is not supported for MixtralForCausalLM'),
    ('qwen2_moe_shared', {'moe_intermediate_size': None},
     "required field 'moe_intermediate_size' is missing"),
    ('qwen2_moe_shared', {'shared_expert_intermediate_size': 0},
     'shared_expert_intermediate_size=0 must be positive'),
    ('qwen3_moe_mlp_only', {'mlp_only_layers': 1}, 'mlp_only_layers=1 must be a list'),
    ('qwen3_moe_mlp_only', {'mlp_only_layers': [5]}, 'mlp_only_layers names layer 5'),
    ('qwen3_moe_mlp_only', {'hidden_act': 'gelu'}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_config_fields_are_named(name, fields, message):
  with pytest.raises(ConfigError, match=message):
    config_from_hf(dict(hf_config(name), **fields))


def _copy(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(GOLDEN, name), dst)
  return dst, tensors(dst)


def test_missing_expert_and_fused_layout_are_named(tmp_path):
  dst, ts = _copy('mixtral_window', tmp_path)
  gone = 'model.layers.1.block_sparse_moe.experts.3.w2.weight'
  save_file({k: v for k, v in ts.items() if k != gone}, str(dst / 'model.safetensors'))
  with pytest.raises(CheckpointError, match=f'missing tensors {gone}'):
    load_hf(str(dst))
  # transformers 5's in-memory layout: all experts in one gate_up_proj / down_proj tensor.
  dst, ts = _copy('qwen3_moe_mlp_only', tmp_path)
  fused = {k: v for k, v in ts.items() if '.layers.0.mlp.experts.' not in k}
  fused['model.layers.0.mlp.experts.gate_up_proj'] = np.zeros((8, 32, 32), np.float32)
  fused['model.layers.0.mlp.experts.down_proj'] = np.zeros((8, 32, 16), np.float32)
  save_file(fused, str(dst / 'model.safetensors'))
  with pytest.raises(CheckpointError, match='experts.down_proj holds all experts fused'):
    load_hf(str(dst))


def test_export_refuses_what_a_family_cannot_hold():
  mixtral = loaded('mixtral_window')[0]
  with pytest.raises(ConfigError, match='LlamaForCausalLM has no experts but model.num_experts=4'):
    config_to_hf(mixtral, 'LlamaForCausalLM')
  with pytest.raises(ConfigError, match="GPT2LMHeadModel has no experts"):
    config_to_hf(mixtral, 'GPT2LMHeadModel')
  with pytest.raises(ConfigError, match=r"MixtralForCausalLM cannot hold a model with "
                                        r"\{'qkv_bias': True, 'shared_expert_mlp_dim': 40"):
    config_to_hf(loaded('qwen2_moe_shared')[0], 'MixtralForCausalLM')
  with pytest.raises(ConfigError, match=r"cannot hold a model with \{'decoder_sparse_step': 2"):
    config_to_hf(dataclasses.replace(loaded('qwen2_moe_sparse_step')[0], qkv_bias=False,
                                     shared_expert_mlp_dim=0),
                 'MixtralForCausalLM')
  qwen3 = loaded('qwen3_moe_mlp_only')[0]
  with pytest.raises(ConfigError, match=r"Qwen2MoeForCausalLM cannot hold a model with \{'qk_norm'"):
    config_to_hf(qwen3, 'Qwen2MoeForCausalLM')
  with pytest.raises(ConfigError, match='always has a shared expert'):
    config_to_hf(dataclasses.replace(qwen3, qk_norm=False), 'Qwen2MoeForCausalLM')
  with pytest.raises(ConfigError, match='Qwen3MoeForCausalLM is a mixture of experts but'):
    config_to_hf(loaded('mistral_window')[0], 'Qwen3MoeForCausalLM')
  dense_qwen3 = dataclasses.replace(qwen3, num_experts=0, mlp_only_layers=(), moe_mlp_dim=0)
  with pytest.raises(ConfigError, match='no q/k norms but model.qk_norm=True'):
    config_to_hf(dense_qwen3)


@pytest.mark.slow  # compiles a train step: ~10 s on 2 shared cores
def test_lora_on_the_attention_of_an_imported_moe_model_trains(tmp_path):
  from llmjax.train.loop import make_trainer
  from llmjax.train.state import build_state
  src = os.path.join(GOLDEN, 'qwen2_moe_shared')
  base, base_params, _ = loaded('qwen2_moe_shared')
  c = config_lib.base_config('tiny')
  c.model.update(dataclasses.asdict(base))
  c.model.update(lora_rank=4, lora_targets=('q', 'k', 'v', 'o'))
  c.init.hf_dir = src
  c.train.update(dict(batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.0))
  cfg = ModelConfig.from_dict(c.model)
  trainer = make_trainer(c, cfg, sharding.make_mesh(c.mesh), sharding.rules_from_config(c))
  state = build_state(trainer, c, cfg)
  before = traverse_util.flatten_dict(jax.device_get(state.params))
  for path, x in traverse_util.flatten_dict(base_params).items():  # the base is the checkpoint's
    np.testing.assert_array_equal(before[path], x)
  rows = np.random.default_rng(0).integers(3, 256, size=(2, 17)).astype(np.int32)
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:],
           'segment_ids': np.ones((2, 16), np.int32),
           'positions': np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)),
           'loss_mask': np.ones((2, 16), np.float32)}
  state, m = trainer.train_step(state, batch)
  state, m2 = trainer.train_step(state, batch)
  assert np.isfinite(float(m['loss'])) and 'aux_loss' in m
  assert float(m2['loss']) < float(m['loss'])
  after = traverse_util.flatten_dict(jax.device_get(state.params))
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all(lora.is_adapter(p) for p in changed), changed
  assert not any('moe' in p for p in changed)  # the experts and router stay frozen
