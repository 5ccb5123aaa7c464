"""The state builder: fresh, init.params_dir and init.hf_dir runs start from one builder that
checks the architecture first, reads only params into the target dtype and shardings, and
initialises only what the source lacks."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax import sharding
from llmjax.errors import UserError
from llmjax.models import lora
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import init_params
from llmjax.train import checkpoint
from llmjax.train import state as state_lib
from llmjax.train.loop import make_trainer, train_and_evaluate

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'llama_gqa_llama3')


def _config(**model):
  c = config_lib.base_config('tiny', vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64)
  c.model.update(model)
  c.train.update(dict(steps=4, batch_size=2, warmup_steps=1))
  c.data.seq_len = 16
  return c


def _write_workdir(path, cfg: ModelConfig, params) -> None:
  """A workdir as `llmjax.convert --from=hf` writes one: model_config.json + step 0 params."""
  checkpoint.write_params_workdir(str(path), cfg, params)


def _trainer(c):
  cfg = config_lib.validate(c)
  mesh = sharding.make_mesh(c.mesh)
  return cfg, make_trainer(c, cfg, mesh, sharding.rules_from_config(c))


def test_params_dir_of_a_bf16_export_trains_float32_master_weights(tmp_path):
  src_cfg = ModelConfig.from_dict(_config(param_dtype='bfloat16', dtype='bfloat16').model)
  src = init_params(src_cfg, jax.random.key(1))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(src))
  _write_workdir(tmp_path / 'src', src_cfg, src)
  c = _config()  # param_dtype float32
  c.init.params_dir = str(tmp_path / 'src')
  cfg, tr = _trainer(c)
  state = state_lib.build_state(tr, c, cfg)
  assert int(state.step) == 0
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(src)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))
  # Fresh Adam moments (zeros, float32), not the source's.
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(state.opt_state)
             if x.ndim >= 1)


def test_params_dir_of_a_lora_run_is_merged_and_gets_fresh_adapters(tmp_path):
  src_cfg = ModelConfig.from_dict(_config(lora_rank=4).model)
  src = init_params(src_cfg, jax.random.key(2))
  src = jax.tree.map(lambda x: x + 0.01, src)  # nonzero lora_b: merging changes the kernels
  _write_workdir(tmp_path / 'src', src_cfg, src)
  merged, _ = lora.merge(src, src_cfg)
  c = _config(lora_rank=2, lora_targets=('q', 'v'))  # other adapters on the merged base
  c.init.params_dir = str(tmp_path / 'src')
  cfg, tr = _trainer(c)
  state = state_lib.build_state(tr, c, cfg)
  adapters, base = lora.split(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), base, merged)
  fresh, _ = lora.split(jax.device_get(tr.init(jax.random.key(c.train.seed)).params))
  jax.tree.map(np.testing.assert_array_equal, adapters, fresh)  # the run's own init


def test_a_mismatched_or_mistyped_params_dir_is_one_line_before_compiling(tmp_path):
  src_cfg = ModelConfig.from_dict(_config(num_layers=3, mlp_dim=96).model)
  _write_workdir(tmp_path / 'src', src_cfg, init_params(src_cfg, jax.random.key(0)))
  c = _config()
  c.init.params_dir = str(tmp_path / 'src')
  with pytest.raises(UserError, match=r"^init.params_dir: the experiment's model differs from .*"
                                      r"model.num_layers=2 but .* has 3; model.mlp_dim=64 but"
                                      r" .* has 96\. ") as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)
  c.init.params_dir = str(tmp_path / 'typo')
  with pytest.raises(UserError, match='not an llmjax workdir'):
    config_lib.validate(c)
  assert not os.path.exists(tmp_path / 'typo')  # no PATH/checkpoints created by the check
  # A workdir with a model config but no checkpoint: named before anything compiles.
  os.makedirs(tmp_path / 'empty')
  checkpoint.write_model_config(str(tmp_path / 'empty'), config_lib.validate(_config()))
  c.init.params_dir = str(tmp_path / 'empty')
  with pytest.raises(UserError, match='no checkpoint in'):
    config_lib.validate(c)


def test_init_from_never_materialises_a_random_copy_of_what_the_source_gives():
  c = _config()
  cfg, tr = _trainer(c)
  given = jax.device_get(tr.init(jax.random.key(0)).params)
  fresh_hlo = tr.init.lower(jax.random.key(0)).compile().as_text()
  from_hlo = tr.init_from.lower(given, jax.random.key(0)).compile().as_text()
  # The fresh init draws random numbers; completing a full set of params draws none.
  assert 'threefry' in fresh_hlo.lower() or 'rng' in fresh_hlo.lower()
  assert 'threefry' not in from_hlo.lower() and 'rng-bit-generator' not in from_hlo.lower()


def test_hf_dir_without_a_pinned_preset_takes_the_checkpoints_architecture():
  c = config_lib.base_config()  # model.preset == '': not pinned
  assert c.model.preset == ''
  c.init.hf_dir = GOLDEN
  c.model.update(remat='full', lora_rank=2)
  c.data.seq_len = 16
  cfg = config_lib.validate(c)
  from llmjax.interop import load_hf
  want, _, _ = load_hf(GOLDEN)
  for f in dataclasses.fields(ModelConfig):
    if f.name in ('remat', 'lora_rank', 'param_dtype', 'dtype', 'scan_layers'):
      continue
    assert getattr(cfg, f.name) == getattr(want, f.name), f.name
  assert (cfg.remat, cfg.lora_rank, cfg.param_dtype) == ('full', 2, 'float32')
  # A pinned preset must match the checkpoint: the one-line mismatch error.
  c = config_lib.base_config('tiny')
  c.init.hf_dir = GOLDEN
  with pytest.raises(UserError, match=r"^init.hf_dir: the experiment's model differs from"):
    config_lib.validate(c)


def test_params_dir_without_a_pinned_preset_takes_the_runs_architecture(tmp_path):
  # As from an HF dir: an unpinned experiment (experiments/dpo.py, sft.py without a variant)
  # continues whatever model the run holds, run the experiment's way (its runtime fields).
  src_cfg = ModelConfig.from_dict(_config(num_layers=3, mlp_dim=96).model)
  _write_workdir(tmp_path / 'src', src_cfg, init_params(src_cfg, jax.random.key(0)))
  c = config_lib.base_config()
  assert c.model.preset == ''
  c.init.params_dir = str(tmp_path / 'src')
  c.model.update(remat='full', lora_rank=2)
  c.data.seq_len = 16
  cfg = config_lib.validate(c)
  for f in dataclasses.fields(ModelConfig):
    if f.name not in ('remat', 'lora_rank'):
      assert getattr(cfg, f.name) == getattr(src_cfg, f.name), f.name
  assert (cfg.remat, cfg.lora_rank) == ('full', 2)


def _run_config(**train):
  import test_loop  # the quickstart shrunk to seconds
  c = test_loop.tiny_config(**train)
  c.sample.prompts = ()
  return c


@pytest.mark.slow
def test_a_resumed_fine_tune_equals_an_uninterrupted_one(tmp_path):
  base = tmp_path / 'base'
  train_and_evaluate(_run_config(steps=12), str(base))

  def fine_tune(workdir, **train):
    c = _run_config(steps=8, eval_every=4, **train)
    c.init.params_dir = str(base)
    c.data.tokenizer_path = str(base / 'tokenizer.model')
    return train_and_evaluate(c, str(workdir))

  fine_tune(tmp_path / 'full')
  out = fine_tune(tmp_path / 'split', stop_at_step=3)
  assert out['step'] == 3
  out = fine_tune(tmp_path / 'split')  # resumes from its own step 3, not from init.params_dir
  assert out['step'] == 8
  rows = lambda d: {r['step']: r['loss'] for r in map(json.loads, open(d / 'metrics.jsonl'))
                    if 'loss' in r}
  want, got = rows(tmp_path / 'full'), rows(tmp_path / 'split')
  assert sorted(got) == list(range(1, 9)) and got == want
  # Fine-tuning started from the base run's weights: its first loss is far below the first
  # loss of the (freshly initialised) base run.
  assert want[1] < rows(base)[1] - 0.5


@pytest.mark.slow
def test_experiments_sft_fine_tunes_a_checkpoint_without_a_matching_preset(tmp_path):
  """experiments/sft.py pins no preset: the golden Llama checkpoint (2 layers, d=64, not a
  preset) trains as is, in float32 master weights, from its own weights."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = tmp_path / 'sft.jsonl'
  data.write_text(''.join(json.dumps({'prompt': f'Q: {i} + 1?\nA:', 'completion': f' {i + 1}'})
                          + '\n' for i in range(40)))
  c = config_lib.load_config(os.path.join(root, 'experiments/sft.py:seq_len=32,batch=4'))
  c.init.hf_dir = GOLDEN
  c.data.path = str(data)
  c.data.eval_batches = 1
  c.model.dtype = 'float32'
  c.train.update(dict(steps=2, lr=0.0, eval_every=2, log_every=1))
  out = train_and_evaluate(c, str(tmp_path / 'run'))
  assert out['step'] == 2
  from llmjax.interop import load_hf
  want_cfg, want, _ = load_hf(GOLDEN, scan_layers=False)  # the experiment's (tiny's) layout
  saved = checkpoint.read_model_config(str(tmp_path / 'run'))
  assert (saved.num_layers, saved.embed_dim, saved.vocab_size) == (
      want_cfg.num_layers, want_cfg.embed_dim, want_cfg.vocab_size)
  got, _ = checkpoint.restore_params(str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, got, want)  # lr 0: still the checkpoint's
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(got))
